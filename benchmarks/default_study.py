"""The default-model study: routing levers against the dense-equivalent, one run per call.

    python benchmarks/default_study.py NAME '{"switch_coef": 0.01}' --out runs.jsonl
    python benchmarks/default_study.py --report runs.jsonl --png docs/default_model_loss.png

A run trains one configuration in this process (HiMoEConfig defaults, overridden by the
JSON object; `"preset"` selects a preset first, as the command line does) and appends one
JSON line: validation loss, load CV and dead experts per layer at every evaluation, and
the training tokens/s. Runs are separate processes so that two can share a machine, each
on one thread (--threads). `--report` prints a Markdown table of the last evaluation of
every run (mean over seeds: names that differ only in a trailing -SEED) and draws the
validation curves. docs/routing_study.md says which runs the committed tables are.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from himoe.cli.presets import preset_values
from himoe.config import HiMoEConfig
from himoe.training.trainer import Trainer


def run(name: str, overrides: dict, out: Path) -> dict:
    overrides = dict(overrides)
    preset = overrides.pop("preset", None)
    with tempfile.TemporaryDirectory(prefix="himoe-study-") as tmp:
        values = dict(device="cpu", sample_tokens=8, model_dir=str(Path(tmp) / "m"),
                      **overrides)
        if preset:
            values = preset_values(preset, values)
        cfg = dataclasses.replace(HiMoEConfig(), **values).validate()
        t0 = time.perf_counter()
        trainer = Trainer(cfg, out=io.StringIO())
        result = trainer.train()
        total, active = trainer.model.parameter_counts()
    line = {"name": name, "overrides": overrides | ({"preset": preset} if preset else {}),
            "seconds": round(time.perf_counter() - t0, 1), "total": total, "active": active,
            "evals": [{"step": e["step"], "val": round(e["val_loss"], 4),
                       "cv": [round(layer["expert_cv"], 3) for layer in e["layers"]],
                       "maxvio": [round(layer["expert_maxvio"], 3) for layer in e["layers"]],
                       "dead": [layer["dead_experts"] for layer in e["layers"]],
                       "tok_s": round(e["tokens_per_s"])} for e in result.evals]}
    with out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    return line


def variant_of(name: str) -> str:
    return re.sub(r"-\d+$", "", name)


def report(lines: list[dict], png: Path | None) -> str:
    by_variant: dict[str, list[dict]] = {}
    for line in lines:
        by_variant.setdefault(variant_of(line["name"]), []).append(line)
    head = "| variant | seeds | val loss, mean [runs] | load CV per layer (max over seeds) " \
           "| dead experts | train tok/s |"
    rows = [head, "| --- | --- | --- | --- | --- | --- |"]
    for variant, runs in by_variant.items():
        last = [r["evals"][-1] for r in runs]
        vals = [e["val"] for e in last]
        cvs = [max(e["cv"][i] for e in last) for i in range(len(last[0]["cv"]))]
        rows.append(f"| {variant} | {len(runs)} | {statistics.mean(vals):.4f} "
                    f"[{', '.join(f'{v:.4f}' for v in vals)}] | "
                    f"{' / '.join(f'{c:.2f}' for c in cvs) or '-'} | "
                    f"{max((sum(e['dead']) for e in last), default=0)} | "
                    f"{statistics.mean(e['tok_s'] for e in last):,.0f} |")
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        # Past the default cycle's 10 colours, tab20's 20 keep every variant its own.
        colours = [f"C{i}" for i in range(10)] if len(by_variant) <= 10 else \
            [plt.get_cmap("tab20")(i % 20) for i in range(len(by_variant))]
        for i, (variant, runs) in enumerate(by_variant.items()):
            for j, r in enumerate(runs):
                ax.plot([e["step"] for e in r["evals"]], [e["val"] for e in r["evals"]],
                        color=colours[i], alpha=1.0 if j == 0 else 0.5,
                        label=variant if j == 0 else None, marker="o", ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/char, no auxiliary terms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", nargs="?")
    p.add_argument("overrides", nargs="?", default="{}", help="JSON object of config values")
    p.add_argument("--out", type=Path, default=Path("default_study.jsonl"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", type=Path, help="print the table of a runs file instead")
    p.add_argument("--png", type=Path, help="with --report: draw the validation curves here")
    args = p.parse_args(argv)
    if args.report:
        lines = [json.loads(t) for t in args.report.read_text().splitlines() if t.strip()]
        print(report(lines, args.png))
        return 0
    if not args.name:
        p.error("name a run, or pass --report FILE")
    torch.set_num_threads(args.threads)
    line = run(args.name, json.loads(args.overrides), args.out)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
