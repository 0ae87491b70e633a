"""Sparse upcycling against training from scratch, through the commands a user runs:

    dense N        himoe train --router dense --max_iters N
    upcycled N+N   himoe upcycle --from dense_N, then himoe train --resume --max_iters N
    dense 2N       himoe train --router dense --max_iters 2N
    MoE 2N         himoe train --max_iters 2N            (the default routing)

    python benchmarks/upcycle_study.py --data_file ../shared/data/shakespeare --steps 500 \
        --seeds 1337 1338 --out upcycle_runs --flags "--n_embd 128 --n_head 4"
    python benchmarks/upcycle_study.py --report upcycle_runs --png docs/upcycle_study.png

Each run is a separate `himoe` process on one thread (--threads); a run whose model directory
already holds a finished run is not repeated, and an interrupted one resumes, so the study
can be stopped and started again. `--report` prints a Markdown table of the validation loss
of every run at N and 2N steps of training (the upcycled run counts its dense steps) and
draws the validation curves, the upcycled run's shifted by its N dense steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = ("dense_N", "upcycled", "dense_2N", "moe_2N")


def himoe(args: list[str], threads: int, log: Path) -> None:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("a", encoding="utf-8") as f:
        subprocess.run([sys.executable, "-m", "himoe", *args], env=env, stdout=f,
                       stderr=subprocess.STDOUT, check=True)


def finished(model_dir: Path, steps: int) -> bool:
    try:
        return json.loads((model_dir / "config.json").read_text())["step"] >= steps
    except (OSError, ValueError, KeyError):
        return False


def train(model_dir: Path, steps: int, flags: list[str], threads: int, log: Path) -> None:
    if finished(model_dir, steps):
        return
    resume = ["--resume"] if (model_dir / "config.json").is_file() else []
    himoe(["train", "--model_dir", str(model_dir), "--max_iters", str(steps), *resume,
           *flags], threads, log)


def run_seed(out: Path, seed: int, args, extra: list[str]) -> None:
    common = ["--data_file", args.data_file, "--seed", str(seed), "--eval_interval",
              str(args.eval_interval), "--eval_iters", "20", *extra]
    root, log, n = out / str(seed), out / f"{seed}.log", args.steps
    root.mkdir(parents=True, exist_ok=True)
    train(root / "dense_N", n, [*common, "--router", "dense"], args.threads, log)
    upcycled = root / "upcycled"
    if not (upcycled / "config.json").is_file():
        himoe(["upcycle", "--from", str(root / "dense_N"), "--model_dir", str(upcycled),
               "--noise", str(args.noise), "--seed", str(seed)], args.threads, log)
    train(upcycled, n, [], args.threads, log)  # its corpus and settings: the dense model's
    train(root / "dense_2N", 2 * n, [*common, "--router", "dense"], args.threads, log)
    train(root / "moe_2N", 2 * n, common, args.threads, log)


def curves(out: Path) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """{variant: {seed: [(step of training in all, val loss)]}}."""
    found: dict[str, dict[int, list]] = {}
    for seed_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        dense_steps = json.loads((seed_dir / "dense_N" / "config.json").read_text())["step"]
        for variant in VARIANTS:
            path = seed_dir / variant / "metrics.jsonl"
            if not path.is_file():
                continue
            shift = dense_steps if variant == "upcycled" else 0
            points = [(e["step"] + shift, e["val_loss"]) for e in map(json.loads, path.open())
                      if "val_loss" in e]
            found.setdefault(variant, {})[int(seed_dir.name)] = points
    return found


def report(out: Path, png: Path | None) -> str:
    data = curves(out)
    rows = ["| run | seeds | val loss at N, mean [per seed] | val loss at 2N, mean [per seed] |",
            "| --- | --- | --- | --- |"]
    n = max(step for seeds in data.get("dense_N", {}).values() for step, _ in seeds)
    for variant in VARIANTS:
        cells = []
        for at in (n, 2 * n):
            vals = [dict(points).get(at) for points in data.get(variant, {}).values()]
            vals = [v for v in vals if v is not None]
            cells.append(f"{statistics.mean(vals):.4f} [{', '.join(f'{v:.4f}' for v in vals)}]"
                         if vals else "-")
        rows.append(f"| {variant} | {len(data.get(variant, {}))} | {cells[0]} | {cells[1]} |")
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for color, variant in zip(("C0", "C1", "C2", "C3"), VARIANTS):
            for i, (seed, points) in enumerate(sorted(data.get(variant, {}).items())):
                ax.plot(*zip(*points), color=color, linestyle="-" if i == 0 else "--",
                        label=f"{variant} (seed {seed})")
        ax.axvline(n, color="grey", linewidth=0.5)
        ax.set_xlabel("training steps in all (upcycled: dense steps + MoE steps)")
        ax.set_ylabel("validation loss (nats/char)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_file", default="../shared/data/shakespeare")
    parser.add_argument("--steps", type=int, default=500, help="N")
    parser.add_argument("--eval_interval", type=int, default=125)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--flags", default="", help="more `himoe train` flags, quoted")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("upcycle_runs"))
    parser.add_argument("--report", type=Path, help="print the table of a finished --out")
    parser.add_argument("--png", type=Path)
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report, args.png))
        return 0
    for seed in args.seeds:
        run_seed(args.out, seed, args, shlex.split(args.flags))
    print(report(args.out, args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
