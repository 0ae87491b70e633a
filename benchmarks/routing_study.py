"""Routing study: every preset, same data split, steps and active parameters per token.

    python benchmarks/routing_study.py            # the full study (< 1 hour on 2 cores)
    python benchmarks/routing_study.py --smoke    # seconds: keeps the script working

Trains each preset (two seeds) on the Shakespeare corpus in ../shared/data/shakespeare when
present (Hamlet otherwise) and writes docs/routing_study.md with a table and two PNGs:
expert load per variant and validation-loss curves. Validation loss never includes the
auxiliary routing terms.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from himoe.cli.presets import preset_values
from himoe.config import HiMoEConfig
from himoe.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["himoe-card", "himoe-balanced", "hi-moe", "minimoe", "olmoe", "dense"]
# A smaller shape than the card's, so twelve runs fit in an hour; the routing shape
# (6 groups x 8 experts, top-1) and the active-parameter budget rule are the card's.
STUDY = dict(n_embd=128, n_head=4, n_layer=2, block_size=128, batch_size=16, max_iters=600,
             eval_interval=100, eval_iters=10, dropout=0.1, lr=1e-3, warmup_iters=100)
SMOKE = dict(n_embd=32, n_head=2, n_layer=1, block_size=32, batch_size=4, max_iters=6,
             eval_interval=3, eval_iters=1, dropout=0.0, warmup_iters=2, sample_tokens=8)


def corpus_file(tmp: Path, smoke: bool) -> tuple[Path, str]:
    """The plays concatenated in name order (one fixed split for every run), or Hamlet."""
    plays = ROOT.parent / "shared" / "data" / "shakespeare"
    if plays.is_dir() and not smoke:
        path = tmp / "shakespeare.txt"
        files = sorted(plays.glob("*.txt"))
        path.write_text("\n\n".join(f.read_text(encoding="utf-8") for f in files),
                        encoding="utf-8")
        return path, f"{len(files)} Shakespeare texts from {plays}"
    from himoe.data.corpus_files import default_corpus_path

    return default_corpus_path(), "Hamlet (the shipped corpus)"


def run_one(variant: str, seed: int, shape: dict, data: Path, out_dir: Path) -> dict:
    values = preset_values(variant, dict(shape, seed=seed, data_file=str(data), device="cpu",
                                         model_dir=str(out_dir / f"{variant}-{seed}")))
    cfg = dataclasses.replace(HiMoEConfig(), **values).validate()
    t0 = time.perf_counter()
    trainer = Trainer(cfg, out=io.StringIO())
    result = trainer.train()
    last = result.evals[-1]
    layers = last["layers"]
    return {
        "variant": variant, "seed": seed, "seconds": time.perf_counter() - t0,
        "total_params": trainer.model.parameter_counts()[0],
        "active_params": trainer.model.parameter_counts()[1],
        "val_loss": last["val_loss"], "val_ppl": last["val_ppl"],
        "tokens_per_s": statistics.mean(e["tokens_per_s"] for e in result.evals),
        "curve": [(e["step"], e["val_loss"]) for e in result.evals],
        "cv": _mean(layers, "expert_cv"), "maxvio": _mean(layers, "expert_maxvio"),
        "dead": sum(layer["dead_experts"] for layer in layers),
        "load": [layer["expert_share"] for layer in layers],
    }


def _mean(layers: list[dict], key: str) -> float | None:
    return statistics.mean(layer[key] for layer in layers) if layers else None


def summarise(runs: list[dict]) -> dict[str, dict]:
    by_variant: dict[str, list[dict]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run)
    summary = {}
    for variant, rs in by_variant.items():
        row = {"runs": rs}
        for key in ("val_loss", "val_ppl", "cv", "maxvio", "tokens_per_s", "dead"):
            values = [r[key] for r in rs if r[key] is not None]
            row[key] = statistics.mean(values) if values else None
            row[key + "_range"] = (min(values), max(values)) if values else None
        row["active_params"] = rs[0]["active_params"]
        row["total_params"] = rs[0]["total_params"]
        summary[variant] = row
    return summary


def fmt(value, spec: str, rng=None) -> str:
    if value is None:
        return "-"
    text = format(value, spec)
    if rng is not None and rng[0] != rng[1]:
        text += f" [{format(rng[0], spec)}, {format(rng[1], spec)}]"
    return text


def claims(summary: dict) -> list[str]:
    """Plain statements of the Hi-MoE paper's two claims, as measured here."""
    lines = []
    hi, flat = summary.get("hi-moe"), summary.get("olmoe")
    if hi and flat:
        lower = hi["val_ppl"] < flat["val_ppl"]
        rel = (flat["val_ppl"] - hi["val_ppl"]) / flat["val_ppl"]
        lines.append(f"- Perplexity: hi-moe {hi['val_ppl']:.2f} vs olmoe (flat top-k + Switch) "
                     f"{flat['val_ppl']:.2f}: {'lower' if lower else 'not lower'} by "
                     f"{abs(rel):.1%} (the paper claims 5.6% lower at 7B). "
                     + ("Holds here." if lower else "Does not hold here."))
        cv_rel = (flat["cv"] - hi["cv"]) / flat["cv"] if flat["cv"] else 0.0
        lines.append(f"- Expert balance: load CV hi-moe {hi['cv']:.3f} vs olmoe {flat['cv']:.3f}: "
                     f"{cv_rel:.0%} lower (the paper claims about 40% better balance). "
                     + ("Holds here." if cv_rel >= 0.3 else "Does not hold here."))
    card, dense = summary.get("himoe-card"), summary.get("dense")
    if card and dense:
        lines.append(f"- The card's routing without a balancing loss: CV {card['cv']:.3f}, "
                     f"{card['dead']:.0f} dead experts (summed over layers); validation loss "
                     f"{card['val_loss']:.3f} vs dense-equivalent {dense['val_loss']:.3f}.")
    return lines


def plots(summary: dict, out_dir: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    moe = [v for v in summary if summary[v]["runs"][0]["load"]]
    fig, axes = plt.subplots(len(moe), 1, figsize=(9, 1.6 * len(moe) + 0.6), squeeze=False)
    for ax, variant in zip(axes[:, 0], moe):
        loads = summary[variant]["runs"][0]["load"]
        share = torch.tensor(loads).mean(0)  # averaged over layers
        ax.bar(range(len(share)), share.tolist(), color="tab:blue")
        ax.axhline(1 / len(share), color="black", lw=0.8, ls="--")
        ax.set_ylabel(variant, rotation=0, ha="right", va="center")
        ax.set_xlim(-0.5, len(share) - 0.5)
    axes[-1, 0].set_xlabel("expert (flat id); dashed line: perfectly even load")
    fig.suptitle("Share of validation tokens per expert (seed 1, mean over layers)")
    fig.tight_layout()
    names.append(f"{stem}_load.png")
    fig.savefig(out_dir / names[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, row in summary.items():
        for i, run in enumerate(row["runs"]):
            steps, losses = zip(*run["curve"])
            ax.plot(steps, losses, label=variant if i == 0 else None,
                    color=f"C{list(summary).index(variant)}", alpha=1.0 if i == 0 else 0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (no auxiliary terms)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    names.append(f"{stem}_loss.png")
    fig.savefig(out_dir / names[-1], dpi=110)
    plt.close(fig)
    return names


def report(summary: dict, shape: dict, corpus: str, command: str, pngs: list[str]) -> str:
    head = ["variant", "active / total params", "val loss", "val ppl", "load CV", "MaxVio",
            "dead experts", "train tok/s"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for variant, r in summary.items():
        rows.append("| " + " | ".join([
            variant, f"{r['active_params'] / 1e6:.2f}M / {r['total_params'] / 1e6:.2f}M",
            fmt(r["val_loss"], ".3f", r["val_loss_range"]), fmt(r["val_ppl"], ".2f"),
            fmt(r["cv"], ".3f", r["cv_range"]), fmt(r["maxvio"], ".2f"), fmt(r["dead"], ".1f"),
            fmt(r["tokens_per_s"], ",.0f")]) + " |")
    seeds = len(next(iter(summary.values()))["runs"])
    return "\n".join([
        "# Routing study", "",
        f"Every preset trained with the same data split and number of steps, and the same active "
        f"parameters per token ({seeds} seed{'s' if seeds > 1 else ''} each; means, with "
        "[min, max] over seeds). Training tokens/s are from the training log and depend on "
        "what else the machine was doing. "
        "Figures are at the last evaluation; CV, MaxVio and dead experts are per layer, "
        "averaged over layers (dead experts: summed).", "",
        *rows, "", "## The paper's claims, as measured", "", *claims(summary), "",
        *[f"![{p}]({p})" for p in pngs], "",
        "## Setup", "",
        f"- Corpus: {corpus}; first 90% for training, last 10% for validation.",
        f"- Shape: {json.dumps(shape)}; presets as in docs/routing.md.",
        f"- Machine: {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}; {time.strftime('%Y-%m-%d')}.",
        f"- Command: `{command}`", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="override max_iters")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=str(ROOT / "docs" / "routing_study.md"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to test the script")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = dict(SMOKE if args.smoke else STUDY)
    if args.steps:
        shape.update(max_iters=args.steps, eval_interval=max(1, args.steps // 6))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data, corpus = corpus_file(Path(tmp), args.smoke)
        for variant in args.variants.split(","):
            for seed in range(1, args.seeds + 1):
                run = run_one(variant, seed, shape, data, Path(tmp))
                runs.append(run)
                print(f"{variant} seed {seed}: val loss {run['val_loss']:.4f}, CV "
                      f"{fmt(run['cv'], '.3f')}, {run['seconds']:.0f} s", flush=True)
    summary = summarise(runs)
    pngs = plots(summary, out.parent, out.stem)
    command = "python benchmarks/routing_study.py " + " ".join(argv or sys.argv[1:])
    text = report(summary, shape, corpus, command.strip(), pngs)
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(text, encoding="utf-8")
    tmp_out.replace(out)
    (out.parent / f"{out.stem}.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "load"} for r in runs], indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
