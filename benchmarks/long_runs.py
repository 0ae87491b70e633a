"""Issue 16's 3,000-step comparison, from the model directories of plain `himoe train` runs.

Each run is one user command (one thread each, two at a time on a 2-core machine), resumable:

    OMP_NUM_THREADS=1 himoe train --model_dir runs/default-1337 --max_iters 3000 \\
        --data_file ../shared/data/shakespeare --eval_interval 250 --eval_iters 20 \\
        --seed 1337   # [--resume]
    # likewise --router dense and --preset himoe-card, and seed 1338

Then this script reads every run's metrics.jsonl, scores each finished model on text that
is in no corpus here (`himoe eval`, once; the reports are kept beside the models), and
prints the Markdown table and draws the validation curves:

    python benchmarks/long_runs.py runs/* --outside macbeth=macbeth.txt tempest=tempest.txt \\
        --png docs/default_model_3000.png --jsonl docs/runs/default_model_3000.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def evaluations(model_dir: Path) -> list[dict]:
    """The evaluation lines of a run's metrics.jsonl (those with a validation loss)."""
    lines = (model_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if "val_loss" in e]


def outside_loss(model_dir: Path, name: str, text: Path) -> float:
    """`himoe eval` of the model on a text file, run once and kept as eval-NAME.json."""
    report = model_dir.parent / f"{model_dir.name}.eval-{name}.json"
    if not report.exists():
        done = subprocess.run([sys.executable, "-m", "himoe", "eval", "--model_dir",
                               str(model_dir), "--data_file", str(text), "--json", str(report)],
                              capture_output=True, text=True)
        if done.returncode:  # its progress bar is kept out of the table, its error is not
            sys.exit(f"himoe eval of {model_dir} on {text} failed: {done.stderr.strip()}")
    return json.loads(report.read_text(encoding="utf-8"))["loss"]


def row(name: str, evals: list[dict], outside: dict[str, float], steps: list[int]) -> str:
    at = {e["step"]: e["val_loss"] for e in evals}
    last = evals[-1]
    layers = last.get("layers", [])
    balance = (" / ".join(f"{x['expert_cv']:.2f}" for x in layers) or "-",
               " / ".join(f"{x['expert_maxvio']:.2f}" for x in layers) or "-",
               str(max((x["dead_experts"] for e in evals if e["step"] >= 500
                        for x in e.get("layers", [])), default="")) if layers else "-")
    cells = [name] + [f"{at[s]:.4f}" if s in at else "" for s in steps] + list(balance)
    cells += [f"{v:.4f}" for v in outside.values()]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="model directories of himoe train runs")
    p.add_argument("--outside", nargs="*", default=[], metavar="NAME=FILE",
                   help="texts in no corpus, scored with himoe eval once a run is finished")
    p.add_argument("--steps", default="500,1000,1500,2000,2500,3000")
    p.add_argument("--png", type=Path)
    p.add_argument("--maxvio_png", type=Path, help="also draw each layer's MaxVio_global "
                   "against the step, with the 0.5 target")
    p.add_argument("--jsonl", type=Path, help="also write every evaluation line here")
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    texts = dict(item.split("=", 1) for item in args.outside)
    runs = {d.name: evaluations(d) for d in args.runs if (d / "metrics.jsonl").exists()}
    header = (["run"] + [f"val @{s}" for s in steps]
              + ["load CV layer 1 / 2", "MaxVio_global layer 1 / 2", "dead from step 500 on"]
              + [f"{n} (outside)" for n in texts])
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for d in args.runs:
        if d.name not in runs:
            continue
        done = runs[d.name][-1]["step"] >= steps[-1]
        outside = {n: outside_loss(d, n, Path(f)) for n, f in texts.items()} if done else {}
        print(row(d.name, runs[d.name], outside, steps))
    if args.jsonl:
        with args.jsonl.open("w", encoding="utf-8") as f:
            for name, evals in runs.items():
                for e in evals:
                    f.write(json.dumps({"run": name} | e) + "\n")
    if args.png:
        plot_losses(runs, args.png)
    if args.maxvio_png:
        plot_maxvio(runs, args.maxvio_png)
    return 0


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_losses(runs: dict[str, list[dict]], png: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, evals in runs.items():
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], marker=".",
                label=name, linestyle="--" if "dense" in name else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_ylim(top=2.3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def plot_maxvio(runs: dict[str, list[dict]], png: Path) -> None:
    """One panel per MoE layer: MaxVio_global at each evaluation, runs with MoE layers only."""
    plt = pyplot()
    moe = {name: evals for name, evals in runs.items() if evals[-1].get("layers")}
    n_layers = max(len(evals[-1]["layers"]) for evals in moe.values())
    fig, axes = plt.subplots(1, n_layers, figsize=(5 * n_layers, 4), sharey=True,
                             squeeze=False)
    for i, ax in enumerate(axes[0]):
        for name, evals in moe.items():
            points = [(e["step"], e["layers"][i]["expert_maxvio"]) for e in evals
                      if len(e.get("layers", [])) > i]
            ax.plot(*zip(*points), marker=".", label=name)
        ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":", label="target 0.5")
        ax.set_title(f"layer {i + 1}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MaxVio_global (validation split)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
