"""Issue 33's measurement: branches trained apart and merged, against the same training
tokens spent on a MoE from scratch, on dense, and on sparse upcycling (docs/merge.md).

    python examples/mixed_domains.py --shakespeare ../shared/data/shakespeare --out mix
    python benchmarks/merge_study.py --mix mix --out runs/merge --seed 1337 \\
        --seed_steps 600 --branch_steps 400 --tune_steps 400

Every stage is a plain `himoe` command, one thread each, skipped when its output exists:

- seed:     himoe train --router dense on the mix (BPE, --vocab_size);
- branches: himoe train --init_from seed on each domain alone;
- merged:   himoe merge of the branches, then --resume on the mix (the MoE stage);
- upcycled: himoe upcycle of the seed, then --resume on the mix for the branches' and the
            MoE stage's steps together;
- scratch:  the default MoE, and dense, on the mix for every step of the merged pipeline;
- added:    a fourth domain (C headers, by default Python's own) as a branch of the seed,
            joined to a copy of the tuned merged model with `himoe merge --into`, then
            --add_steps on the four-domain mix; beside it two controls tuned as long: a
            copy without the new group on the same four-domain mix, so that what the new
            group costs the other domains is told apart from what the extra steps and C's
            tokens give them, and a copy on the three-domain mix alone, the same steps
            without the fourth domain at all.

So every model has trained on the same number of tokens (steps x batch), and every MoE has
one level-1 group per domain (--num_experts experts each), as the merged model has. Each is scored
with `himoe eval` on every domain's held-out text and with `himoe analyze` (NMI of domain
and level-1 group); the table goes to stdout, the figures to OUT/merge_study.json and the
validation curves to OUT/merge_curves.png.

    python benchmarks/merge_study.py report runs/merge/s1337 runs/merge/s1338

prints one markdown table over the seeds' results.

    python benchmarks/merge_study.py closed --mix mix runs/merge/s1337

scores merged_plus_c on the three first domains with the added group closed at level 1 (its
selection bias -inf) in each set of layers, to OUT/closed_group.json: what the old domains'
tokens that the new group takes get from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

DOMAINS = ("code", "prose", "drama")
EVAL_EVERY = 100  # steps between the validation losses the curves are drawn from
ADDED = ("merged_plus_c", "merged_more", "merged_more_old_mix")  # tuned after the merge


def himoe(*args, threads: int = 1) -> None:
    cmd = [sys.executable, "-m", "himoe", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": str(threads)})
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr.strip()[-2000:]}")


def domain_files(mix: Path, out: Path) -> dict[str, Path]:
    """Each domain's training documents as its own JSON-lines file (from mix/train.jsonl)."""
    files = {d: out / "domains" / f"{d}.jsonl" for d in DOMAINS}
    if not all(f.exists() for f in files.values()):
        (out / "domains").mkdir(parents=True, exist_ok=True)
        lines = {d: [] for d in DOMAINS}
        for line in (mix / "train.jsonl").read_text(encoding="utf-8").splitlines():
            lines[json.loads(line)["domain"]].append(line + "\n")
        for d, f in files.items():
            f.write_text("".join(lines[d]), encoding="utf-8")
    return files


def fourth_domain(folder: Path, out: Path, every: int = 8) -> tuple[Path, Path]:
    """The domain added later: every `.h` file under folder, one document each, every
    `every`-th held out. Returns (training JSON lines, held-out text)."""
    train_file, heldout = out / "domains" / "c.jsonl", out / "domains" / "c.heldout.txt"
    if not train_file.exists():
        docs = [f.read_text(encoding="utf-8", errors="replace")
                for f in sorted(folder.rglob("*.h"))]
        if len(docs) < every:
            sys.exit(f"error: {folder} has {len(docs)} .h files, the fourth domain needs at "
                     f"least {every}; pass --fourth_dir a folder of C headers")
        heldout.write_text("".join(d for i, d in enumerate(docs) if i % every == every - 1),
                           encoding="utf-8")
        train_file.write_text("".join(json.dumps({"domain": "c", "text": d}) + "\n"
                                      for i, d in enumerate(docs) if i % every != every - 1),
                              encoding="utf-8")
    return train_file, heldout


def trained(model_dir: Path, steps: int) -> bool:
    config = model_dir / "config.json"
    return config.exists() and json.loads(config.read_text())["step"] >= steps


def train(model_dir: Path, steps: int, *flags, resume: bool = False) -> None:
    if not trained(model_dir, steps):
        himoe("train", "--model_dir", model_dir, "--max_iters", steps, "--eval_interval",
              min(EVAL_EVERY, steps), "--eval_iters", 10, "--sample_tokens", 10, "--device", "cpu",
              *(["--resume"] if resume else []), *flags)


def pipeline(args, files: dict[str, Path]) -> dict[str, Path]:
    out, mix = args.out, args.mix / "train.jsonl"
    common = ["--seed", args.seed, "--batch_size", args.batch_size]
    shape = args.shape.split()
    groups = ["--num_moes", len(DOMAINS), "--num_experts", args.num_experts]
    seed = out / "seed"
    train(seed, args.seed_steps, "--router", "dense", "--data_file", mix, "--tokenizer", "bpe",
          "--vocab_size", args.vocab_size, *shape, *common)
    for d, f in files.items():
        train(out / f"branch_{d}", args.branch_steps, "--init_from", seed, "--data_file", f,
              *common)
    merged = out / "merged"
    if not (merged / "config.json").exists():
        branches = [x for d in DOMAINS for x in ("--from", out / f"branch_{d}")]
        corpora = [x for d in DOMAINS for x in ("--corpus", files[d])]
        himoe("merge", *branches, *corpora, "--model_dir", merged, "--num_experts",
              args.num_experts)
    train(merged, args.tune_steps, "--data_file", mix, resume=True)
    total = args.seed_steps + len(DOMAINS) * args.branch_steps + args.tune_steps
    upcycled = out / "upcycled"
    if not (upcycled / "config.json").exists():
        himoe("upcycle", "--from", seed, "--model_dir", upcycled, "--noise", 0.01, *groups)
    train(upcycled, total - args.seed_steps, "--data_file", mix, resume=True)
    for name, flags in (("scratch_moe", groups), ("scratch_dense", ["--router", "dense"])):
        train(out / name, total, "--data_file", mix, "--tokenizer", "bpe", "--vocab_size",
              args.vocab_size, *shape, *common, *flags)
    return {"merged": merged, "upcycled": upcycled, "scratch_moe": out / "scratch_moe",
            "scratch_dense": out / "scratch_dense"}


def add_later(args, merged: Path, c_train: Path) -> dict[str, Path]:
    """The fourth domain's branch joined to a copy of the merged model with --into, and the
    controls: copies without it. All go on --add_steps, on the four-domain mix but for
    merged_more_old_mix, which stays on the three domains' mix."""
    out, mix = args.out, args.mix / "train.jsonl"
    branch = out / "branch_c"
    train(branch, args.branch_steps, "--init_from", out / "seed", "--data_file", c_train,
          "--seed", args.seed, "--batch_size", args.batch_size)
    mix4 = out / "domains" / "mix4.jsonl"
    if not mix4.exists():
        mix4.write_text(mix.read_text(encoding="utf-8") + c_train.read_text(encoding="utf-8"),
                        encoding="utf-8")
    models = {name: out / name for name in ADDED}
    for name, model_dir in models.items():
        if not (model_dir / "config.json").exists():
            # the tuned merged model as it was, without what analyze wrote into it
            shutil.copytree(merged, model_dir, ignore=shutil.ignore_patterns("analysis"))
            if name == "merged_plus_c":
                himoe("merge", "--into", model_dir, "--from", branch, "--corpus", mix,
                      "--corpus", c_train)
        train(model_dir, args.tune_steps + args.add_steps, "--data_file",
              mix if name == "merged_more_old_mix" else mix4, resume=True)
    return models


def scores(model_dir: Path, heldout: dict[str, Path], routed: tuple[str, ...]) -> dict:
    """Held-out loss on every domain of heldout ({domain: text file}), and level-1
    NMI(domain; group) per layer over the routed domains where the model has MoE layers."""
    figures = {}
    for d, text in heldout.items():
        report = model_dir.parent / f"{model_dir.name}.{d}.json"
        if not report.exists():
            himoe("eval", "--model_dir", model_dir, "--data_file", text, "--device", "cpu",
                  "--json", report)
        figures[d] = json.loads(report.read_text())["loss"]
    analysis = model_dir / "analysis" / "analysis.json"
    router = json.loads((model_dir / "config.json").read_text())["config"]["router"]
    if not analysis.exists() and router != "dense":
        himoe("analyze", "--model_dir", model_dir, "--no_plots",
              *[x for d in routed for x in ("--domain", f"{d}={heldout[d]}")])
    if analysis.exists():
        figures["nmi_group"] = [x["nmi_group"] for x in json.loads(analysis.read_text())["layers"]]
        last = [r for r in map(json.loads, (model_dir / "metrics.jsonl").read_text().splitlines())
                if r.get("layers")][-1]  # the balance at the run's last evaluation
        figures["balance"] = [{"cv": x["expert_cv"], "maxvio": x["expert_maxvio"],
                               "within_cv": within_group_cv(x), "dead": x["dead_experts"]}
                              for x in last["layers"]]
    return figures


def within_group_cv(layer: dict) -> float:
    """The largest expert-load CV inside one group: what level-2 balancing evens out. The
    load across groups follows level 1's targets (merge's group_shares), which the CV over
    all experts counts as imbalance."""
    shares, sizes = layer["expert_share"], layer["group_sizes"]
    M = len(shares) // len(sizes)
    rows = [shares[g * M:g * M + n] for g, n in enumerate(sizes)]
    return max(statistics.pstdev(r) / statistics.fmean(r) if sum(r) else 0.0 for r in rows)


def report(outs: list[Path]) -> str:
    """One markdown table over several seeds' OUT/merge_study.json: every figure as the mean
    over seeds and, in brackets, each seed's."""
    runs = [json.loads((out / "merge_study.json").read_text()) for out in outs]

    def cell(values: list[float], fmt: str = "{:.4f}") -> str:
        each = ", ".join(fmt.format(v) for v in values)
        return fmt.format(sum(values) / len(values)) + (f" ({each})" if len(values) > 1 else "")

    def per_layer(values: list[list[float]], fmt: str) -> str:
        return " / ".join(cell([v[i] for v in values], fmt) for i in range(len(values[0])))

    columns = (*DOMAINS, "c")
    lines = [f"Seeds: {', '.join(out.name for out in outs)}; held-out loss per domain (nats), "
             "mean (each seed)", "",
             "| model | " + " | ".join(columns) + " | level-1 NMI per layer | "
             "expert load CV per layer | MaxVio per layer | largest CV within a group |",
             "| --- |" + " --- |" * (len(columns) + 4)]
    for name in (n for n in runs[0] if n != "added_c"):
        figs = [r[name] for r in runs]
        routed = "nmi_group" in figs[0]
        extra = [per_layer([f["nmi_group"] for f in figs], "{:.2f}"),
                 per_layer([[x["cv"] for x in f["balance"]] for f in figs], "{:.2f}"),
                 per_layer([[x["maxvio"] for x in f["balance"]] for f in figs], "{:.2f}"),
                 per_layer([[x["within_cv"] for x in f["balance"]] for f in figs], "{:.2f}")] \
            if routed else ["-"] * 4
        lines.append(f"| {name} | " + " | ".join(cell([f[d] for f in figs]) for d in columns)
                     + " | " + " | ".join(extra) + " |")
    added = [r["added_c"] for r in runs]
    lines += ["", "The fourth domain added with `merge --into` (nats; positive: the loss went "
              "down):", "",
              "| | c | " + " | ".join(DOMAINS) + " |", "| --- |" + " --- |" * (len(DOMAINS) + 1),
              "| after against before | " + cell([a["gain_on_c"] for a in added], "{:+.4f}")
              + " | " + " | ".join(cell([a["others_change"][d] for a in added], "{:+.4f}")
                                   for d in DOMAINS) + " |",
              "| after against the control on the four domains (merged_more) | - | "
              + " | ".join(cell([a["others_change_against_control"][d] for a in added],
                                "{:+.4f}") for d in DOMAINS) + " |",
              "| after against the same steps on the three domains (merged_more_old_mix) | - | "
              + " | ".join(cell([a["others_change_against_old_mix"][d] for a in added],
                                "{:+.4f}") for d in DOMAINS) + " |"]
    return "\n".join(lines) + "\n"


def closed_group(mix: Path, out: Path) -> dict:
    """Held-out loss of merged_plus_c on each first domain with the last level-1 group (the
    one --into added) closed in no layer, in each layer alone, and in every layer."""
    import torch

    from himoe.checkpoint.card import load_model
    from himoe.data.corpora import open_corpus
    from himoe.data.tokenizers import tokenizer_for
    from himoe.eval.perplexity import evaluate_text

    model_dir = out / "merged_plus_c"
    model, cfg, vocab, _ = load_model(model_dir)
    tokenizer = tokenizer_for(cfg, vocab, model_dir)
    biases_N = [block.ffn.router.group_bias_N for block in model.blocks]
    kept = [b_N.clone() for b_N in biases_N]
    layers = range(len(biases_N))
    figures = {}
    for closed in [(), *((i,) for i in layers), *([tuple(layers)] if len(layers) > 1 else [])]:
        for i, b_N in enumerate(biases_N):
            b_N.copy_(kept[i])
            if i in closed:
                b_N[-1] = float("-inf")  # never among the top groups; weights never see it
        figures["closed in " + (", ".join(f"layer {i + 1}" for i in closed) or "none")] = {
            d: evaluate_text(model, tokenizer, open_corpus(str(mix / "heldout" / f"{d}.txt")),
                             16, torch.device("cpu"), torch.float32)["loss"] for d in DOMAINS}
    (out / "closed_group.json").write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def curve(model_dir: Path, offset: int) -> tuple[list[int], list[float]]:
    """(pipeline steps, validation loss) of one run's evaluations, its steps moved by offset."""
    rows = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "val_loss" in r]
    return [offset + r["step"] for r in rows], [r["val_loss"] for r in rows]


def plot(args, models: dict[str, Path], png: Path) -> None:
    """Validation loss on the mix against the pipeline's training steps (all at one batch
    size, so steps are tokens): the branches' steps come before the merged model's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = curve(args.out / "seed", 0)
    branched = args.seed_steps + len(DOMAINS) * args.branch_steps
    lines = {"seed (dense, on the mix)": seed,
             # the branches trained on whole domains, the mix's validation documents too
             "merged (its branches saw these documents)": curve(models["merged"], branched),
             "upcycled seed": curve(models["upcycled"], args.seed_steps),
             "MoE from scratch": curve(models["scratch_moe"], 0),
             "dense from scratch": curve(models["scratch_dense"], 0)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (x, y) in lines.items():
        ax.plot(x, y, marker=".", label=label)
    ax.axvspan(args.seed_steps, branched, color="0.92", label="branches train apart")
    ax.set_xlabel(f"training steps of the whole pipeline (x {args.batch_size} sequences)")
    ax.set_ylabel("validation loss on the mix (nats)")
    ax.set_title(f"Branch, merge, tune against training on the mix (seed {args.seed})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:  # report OUT [OUT ...]: the seeds' table, from what they wrote
        print(report([Path(x) for x in argv[1:]]), end="")
        return 0
    if argv[:1] == ["closed"]:  # closed --mix MIX OUT
        p = argparse.ArgumentParser(description="the added group closed at level 1")
        p.add_argument("--mix", type=Path, required=True)
        p.add_argument("out", type=Path)
        args = p.parse_args(argv[1:])
        for name, losses in closed_group(args.mix, args.out).items():
            print(f"{name}: " + ", ".join(f"{d} {x:.4f}" for d, x in losses.items()))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mix", type=Path, required=True, help="what examples/mixed_domains.py wrote")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--seed_steps", type=int, default=600)
    p.add_argument("--branch_steps", type=int, default=400)
    p.add_argument("--tune_steps", type=int, default=400)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--num_experts", type=int, default=8, help="experts per level-1 group")
    p.add_argument("--add_steps", type=int, default=200,
                   help="steps on the four-domain mix after the fourth domain is added")
    p.add_argument("--fourth_dir", type=Path, default=Path(sysconfig.get_paths()["include"]),
                   help="C headers for the domain added later (default: Python's own)")
    p.add_argument("--shape", default="", help="backbone flags of the seed and the "
                   "from-scratch runs, e.g. '--n_layer 4 --n_embd 384' (default: himoe's)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    files = domain_files(args.mix, args.out)
    c_train, c_heldout = fourth_domain(args.fourth_dir, args.out)
    models = pipeline(args, files)
    models |= add_later(args, models["merged"], c_train)
    heldout = {d: args.mix / "heldout" / f"{d}.txt" for d in DOMAINS} | {"c": c_heldout}
    results = {name: scores(path, heldout, DOMAINS + ("c",) if name in ADDED else DOMAINS)
               for name, path in models.items()}
    columns = (*DOMAINS, "c")
    print("| model | " + " | ".join(columns) + " | level-1 NMI per layer |")
    print("| --- |" + " --- |" * (len(columns) + 1))
    for name, fig in results.items():
        nmi = " / ".join(f"{x:.2f}" for x in fig.get("nmi_group", []) if x is not None) or "-"
        print(f"| {name} | " + " | ".join(f"{fig[d]:.4f}" for d in columns) + f" | {nmi} |")
    plus, before, control, old_mix = (results[n] for n in ("merged_plus_c", "merged",
                                                           "merged_more", "merged_more_old_mix"))
    results["added_c"] = {  # positive: the loss went down
        "gain_on_c": before["c"] - plus["c"],
        "others_change": {d: before[d] - plus[d] for d in DOMAINS},
        "others_change_against_control": {d: control[d] - plus[d] for d in DOMAINS},
        "others_change_against_old_mix": {d: old_mix[d] - plus[d] for d in DOMAINS}}
    (args.out / "merge_study.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(args, models, args.out / "merge_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
