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
- scratch:  the default MoE, and dense, on the mix for every step of the merged pipeline.

So every model has trained on the same number of tokens (steps x batch), and every MoE has
one level-1 group per domain (--num_experts experts each), as the merged model has. Each is scored
with `himoe eval` on every domain's held-out text and with `himoe analyze` (NMI of domain
and level-1 group); the table goes to stdout and the figures to OUT/merge_study.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DOMAINS = ("code", "prose", "drama")


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


def trained(model_dir: Path, steps: int) -> bool:
    config = model_dir / "config.json"
    return config.exists() and json.loads(config.read_text())["step"] >= steps


def train(model_dir: Path, steps: int, *flags, resume: bool = False) -> None:
    if not trained(model_dir, steps):
        himoe("train", "--model_dir", model_dir, "--max_iters", steps, "--eval_interval",
              steps, "--eval_iters", 10, "--sample_tokens", 10, "--device", "cpu",
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


def scores(model_dir: Path, mix: Path) -> dict:
    """Held-out loss per domain, and level-1 NMI per layer where the model has MoE layers."""
    figures = {}
    for d in DOMAINS:
        report = model_dir.parent / f"{model_dir.name}.{d}.json"
        if not report.exists():
            himoe("eval", "--model_dir", model_dir, "--data_file", mix / "heldout" / f"{d}.txt",
                  "--device", "cpu", "--json", report)
        figures[d] = json.loads(report.read_text())["loss"]
    analysis = model_dir / "analysis" / "analysis.json"
    router = json.loads((model_dir / "config.json").read_text())["config"]["router"]
    if not analysis.exists() and router != "dense":
        himoe("analyze", "--model_dir", model_dir, "--no_plots",
              *[x for d in DOMAINS for x in ("--domain", f"{d}={mix / 'heldout' / f'{d}.txt'}")])
    if analysis.exists():
        figures["nmi_group"] = [x["nmi_group"] for x in json.loads(analysis.read_text())["layers"]]
    return figures


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--shape", default="", help="backbone flags of the seed and the "
                   "from-scratch runs, e.g. '--n_layer 4 --n_embd 384' (default: himoe's)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    files = domain_files(args.mix, args.out)
    results = {name: scores(path, args.mix) for name, path in pipeline(args, files).items()}
    print("| model | " + " | ".join(DOMAINS) + " | level-1 NMI per layer |")
    print("| --- |" + " --- |" * (len(DOMAINS) + 1))
    for name, fig in results.items():
        nmi = " / ".join(f"{x:.2f}" for x in fig.get("nmi_group", []) if x is not None) or "-"
        print(f"| {name} | " + " | ".join(f"{fig[d]:.4f}" for d in DOMAINS) + f" | {nmi} |")
    (args.out / "merge_study.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
