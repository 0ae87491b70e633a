"""What a MoE is for: the default's time to a dense model's quality (docs/efficiency.md).

Three steps, each a plain command; the first takes hours and can be stopped and started:

    python benchmarks/efficiency.py runs --out runs/eff --data_file ../shared/data/shakespeare
        # every run of the grid as its own `himoe train` process, one thread each, --jobs at
        # a time (default 2: one per core); a finished run is skipped, a stopped one resumed
    python benchmarks/efficiency.py time --out runs/eff --data_file ../shared/data/shakespeare
        # the step-time ratio: whole `himoe train` processes of both sides, A B A B, each
        # side's long run minus its short run, at the torch threads a user gets
    python benchmarks/efficiency.py report --out runs/eff --md docs/efficiency_table.md \\
        --json docs/runs/efficiency.json --png docs/efficiency.png
        # scores each finished run on the held-out documents (`himoe eval`, kept beside it)
        # and writes the figures per seed

Every run trains with its own full schedule (warm-up and cosine to its own --max_iters);
a run's loss is its final evaluation, never a checkpoint in the middle of a longer run.
Long runs that share the cores cannot be timed fairly against each other, so the steps
come from the runs and the seconds per step from the `time` step. With L(n) a side's loss
after a run of n steps (interpolated linearly in log n between grid points) and r the
default's seconds per step over dense's:

- time to dense quality = dense's time for its N-step run / the default's time to reach the
  same loss = N / (n_default * r), for N = 3,000 and 12,000 (2.0: twice as fast);
- loss at equal wall-clock = L_default(3,000 / r), beside dense's L(3,000);
- compute multiplier = the dense steps whose loss equals the default's 3,000-step loss,
  divided by 3,000 (only a bound when that loss lies outside dense's grid).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from himoe.bench.throughput import himoe_train_seconds

SIDES = ("default", "dense")
DEFAULT_STEPS = "1000,1500,2000,2500,3000"
DENSE_STEPS = "3000,6000,12000"
REFERENCE_STEPS = "3000,12000"  # dense run lengths whose loss the default must reach
PROCESS_STEPS = (10, 60)  # `time`: the long process's extra steps are what is timed
HELDOUT = "heldout"  # OUT/heldout/: the corpus's validation documents, for `himoe eval`


# --- the grid of runs ---
class Run(NamedTuple):
    side: str
    steps: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.side}-{self.steps}-s{self.seed}"


def parse_name(name: str) -> Run | None:
    side, _, rest = name.partition("-")
    steps, _, seed = rest.partition("-s")
    if side in SIDES and steps.isdigit() and seed.isdigit():
        return Run(side, int(steps), int(seed))
    return None


def grid(seeds: list[int], default_steps: list[int], dense_steps: list[int]) -> list[Run]:
    """Longest runs first, so that two workers end at about the same time."""
    runs = [Run(side, n, s) for s in seeds
            for side, steps in (("default", default_steps), ("dense", dense_steps))
            for n in steps]
    return sorted(runs, key=lambda r: -r.steps)


def evaluations(model_dir: Path) -> list[dict]:
    path = model_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text(encoding="utf-8").splitlines())
            if "val_loss" in e]


def finished(run: Run, out: Path) -> bool:
    evals = evaluations(out / run.name)
    return bool(evals) and evals[-1]["step"] >= run.steps


def train_command(run: Run, out: Path, args, flags: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "himoe", "train", "--model_dir", str(out / run.name),
           "--data_file", args.data_file, "--max_iters", str(run.steps), "--seed",
           str(run.seed), "--eval_interval", str(args.eval_interval), "--eval_iters",
           str(args.eval_iters), "--sample_tokens", "10", "--device", "cpu", *flags]
    # A run stopped after its first save goes on from there.
    return cmd + (["--resume"] if (out / run.name / "config.json").exists() else [])


def side_flags(args) -> dict[str, list[str]]:
    return {"default": shlex.split(args.default_flags),
            "dense": shlex.split(args.dense_flags)}


def cmd_runs(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flags = side_flags(args)
    todo = [r for r in grid(ints(args.seeds), ints(args.default_steps), ints(args.dense_steps))
            if not finished(r, out)]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}

    def train(run: Run) -> str:
        cmd = train_command(run, out, args, flags[run.side])
        with (out / f"{run.name}.log").open("a", encoding="utf-8") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        return f"{run.name}: {'done' if rc == 0 else f'failed (rc {rc}), see its .log'}"

    print(f"{len(todo)} runs to do in {out}, {args.jobs} at a time", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(train, todo):
            print(line, flush=True)
    return 0


# --- the step-time ratio ---
def step_seconds(args, flags: list[str]) -> float:
    """Seconds per step of `himoe train` as a user runs it: a long process minus a short
    one, so start-up, the first evaluation's set-up and the save cancel out."""
    short, long = args.process_steps
    seconds = [himoe_train_seconds(["--data_file", args.data_file, *flags], steps)
               for steps in (long, short)]
    return (seconds[0] - seconds[1]) / (long - short)


def cmd_time(args) -> int:
    flags = side_flags(args)
    per_step = {side: [] for side in SIDES}
    for side in SIDES:  # a warm-up pair, not counted
        step_seconds(args, flags[side])
    for r in range(args.repeats):  # A B A B
        for side in SIDES:
            per_step[side].append(step_seconds(args, flags[side]))
        print(f"pair {r + 1}: {per_step['default'][-1] * 1e3:.0f} ms against "
              f"{per_step['dense'][-1] * 1e3:.0f} ms a step", flush=True)
    ratios = [a / b for a, b in zip(per_step["default"], per_step["dense"])]
    record = {"ratio_default_over_dense": ratios, "seconds_per_step": per_step,
              "process_steps": list(args.process_steps), "threads": os.cpu_count(),
              "flags": {side: shlex.join(f) for side, f in flags.items()}}
    (Path(args.out) / "step_time.json").write_text(json.dumps(record, indent=1))
    print(f"default step / dense step: {spread(ratios)}")
    return 0


# --- the figures ---
def steps_to_reach(curve: dict[int, float], loss: float) -> tuple[float | None, str]:
    """The steps a run of its own schedule needs to end at `loss`: linear in log n between
    the first pair of grid points that brackets it. (None, bound) outside the grid."""
    points = sorted(curve.items())
    if points[0][1] <= loss:
        return None, f"< {points[0][0]}"
    for (n0, l0), (n1, l1) in zip(points, points[1:]):
        if l1 <= loss:
            frac = (l0 - loss) / (l0 - l1)
            return math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0))), ""
    return None, f"> {points[-1][0]}"


def loss_at(curve: dict[int, float], steps: float) -> float | None:
    """A run of `steps` steps, interpolated linearly in log n; None outside the grid."""
    points = sorted(curve.items())
    for (n0, l0), (n1, l1) in zip(points, points[1:]):
        if n0 <= steps <= n1:
            frac = (math.log(steps) - math.log(n0)) / (math.log(n1) - math.log(n0))
            return l0 + frac * (l1 - l0)
    return curve.get(round(steps))


def reference_key(i: int, ref: int) -> str:
    """time_to_dense_quality for the first reference, then ..._12k (or ..._N)."""
    suffix = "" if i == 0 else f"_{ref // 1000}k" if ref % 1000 == 0 else f"_{ref}"
    return "time_to_dense_quality" + suffix


def figures(default: dict[int, float], dense: dict[int, float], ratio: float,
            references: list[int]) -> dict:
    """Every figure of one seed from its two curves (steps -> final loss) and the step-time
    ratio; a figure outside the grid is None with its bound beside it. The first reference
    (3,000) is also the length of the equal-time and compute-multiplier comparisons."""
    out = {"step_time_ratio": ratio}
    for i, ref in enumerate(references):
        key = reference_key(i, ref)
        if ref not in dense:
            out[key], out[key + "_bound"] = None, f"no dense {ref}-step run"
            continue
        n, bound = steps_to_reach(default, dense[ref])
        out[f"default_steps_to_dense_{i}"] = n
        out[key] = ref / (n * ratio) if n else None
        if bound:  # fewer steps than the grid's first: faster than this; more: slower
            n_edge = float(bound.split()[1])
            out[key + "_bound"] = f"{'>' if bound[0] == '<' else '<'} {ref / (n_edge * ratio):.2f}"
    base = references[0]
    if base in dense:
        out["dense_base_loss"] = dense[base]
        equal = loss_at(default, base / ratio)
        out["default_loss_at_equal_time"] = equal
        out["loss_gain_at_equal_time"] = dense[base] - equal if equal is not None else None
    if base in default:
        n, bound = steps_to_reach(dense, default[base])
        out["compute_multiplier"] = n / base if n else None
        if bound:
            out["compute_multiplier_bound"] = (
                f"{'<' if bound[0] == '<' else '>'} {float(bound.split()[1]) / base:.2f}")
    return out


def heldout_dir(out: Path, data_file: str) -> Path:
    """OUT/heldout/: copies of the corpus's validation documents (the plays no run trains
    on), so that `himoe eval` scores every run on all of them, not a sample of windows."""
    from himoe.data.documents import load_documents

    target = out / HELDOUT
    if not target.exists():
        corpus = load_documents(data_file)
        tmp = Path(tempfile.mkdtemp(dir=out))
        for i in corpus.val_indices():
            (tmp / corpus.paths[i].name).write_text(corpus.texts[i], encoding="utf-8")
        tmp.rename(target)
    return target


def heldout_loss(run_dir: Path, texts: Path | None) -> float:
    report = run_dir.parent / f"{run_dir.name}.heldout.json"
    if not report.exists():
        done = subprocess.run([sys.executable, "-m", "himoe", "eval", "--model_dir",
                               str(run_dir), "--data_file", str(texts), "--device", "cpu",
                               "--json", str(report)], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"himoe eval of {run_dir} failed: {done.stderr.strip()}")
    return json.loads(report.read_text(encoding="utf-8"))["loss"]


def curves(out: Path, data_file: str | None) -> dict[str, dict]:
    """{"sampled"|"heldout": {seed: {side: {steps: loss}}}} over the finished runs, plus
    each default run's last balance figures under "balance"."""
    texts = heldout_dir(out, data_file) if data_file else None
    found = {"sampled": {}, "heldout": {}, "balance": {}}
    for run_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        run = parse_name(run_dir.name)
        if run is None or not finished(run, out):
            continue
        last = evaluations(run_dir)[-1]
        found["sampled"].setdefault(run.seed, {}).setdefault(run.side, {})[run.steps] = \
            last["val_loss"]
        if texts is not None or (out / f"{run.name}.heldout.json").exists():  # kept reports
            found["heldout"].setdefault(run.seed, {}).setdefault(run.side, {})[run.steps] = \
                heldout_loss(run_dir, texts)
        if last.get("layers"):
            found["balance"][run.name] = {
                "load_cv": max(x["expert_cv"] for x in last["layers"]),
                "maxvio": max(x["expert_maxvio"] for x in last["layers"]),
                "dead": max(x["dead_experts"] for x in last["layers"])}
    return found


def cmd_report(args) -> int:
    out = Path(args.out)
    if not (out / "step_time.json").exists():
        sys.exit(f"no step_time.json in {out}: time the two sides first with "
                 f"`python benchmarks/efficiency.py time --out {out}`")
    timing = json.loads((out / "step_time.json").read_text(encoding="utf-8"))
    ratios = timing["ratio_default_over_dense"]
    ratio = statistics.median(ratios)
    refs = ints(args.reference_steps)
    found = curves(out, args.data_file)
    result = {"step_time": {"median": ratio, "min": min(ratios), "max": max(ratios),
                            "pairs": len(ratios), "flags": timing["flags"]},
              "reference_steps": refs, "balance": found["balance"], "seeds": {}}
    for split in ("sampled", "heldout"):
        for seed, sides in sorted(found[split].items()):
            if set(sides) != set(SIDES):
                continue
            entry = result["seeds"].setdefault(str(seed), {"curves": {}})
            entry["curves"][split] = {side: {str(n): v for n, v in sorted(c.items())}
                                      for side, c in sides.items()}
            entry[split] = figures(sides["default"], sides["dense"], ratio, refs)
            # The same figures at the fastest and slowest pair: what the timing's spread does.
            entry[split]["at_ratio_min_max"] = {
                reference_key(i, ref): [figures(sides["default"], sides["dense"], r, refs)
                                        .get(reference_key(i, ref))
                                        for r in (min(ratios), max(ratios))]
                for i, ref in enumerate(refs)}
    text = markdown(result)
    print(text)
    if args.md:
        Path(args.md).write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.png:
        plot(found, ratio, refs, Path(args.png))
    return 0


def cell(fig: dict, key: str, fmt: str = "{:.2f}x") -> str:
    value = fig.get(key)
    if value is not None:
        return fmt.format(value)
    bound = fig.get(key + "_bound", "-")
    return bound + "x" if bound[0] in "<>" else bound


def markdown(result: dict) -> str:
    st, refs = result["step_time"], result["reference_steps"]
    lines = [f"Step time, default over dense: {st['median']:.2f}x [{st['min']:.2f}, "
             f"{st['max']:.2f}] ({st['pairs']} pairs of whole `himoe train` processes)", ""]
    header = (["seed", "loss on", f"dense {refs[0]:,}", "default steps to it"]
              + [f"time to dense {r:,}-step quality" for r in refs]
              + [f"default at dense's {refs[0]:,}-step time", "compute multiplier"])
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for seed, entry in result["seeds"].items():
        for split in ("sampled", "heldout"):
            fig = entry.get(split)
            if not fig:
                continue
            n = fig.get("default_steps_to_dense_0")
            equal = fig.get("default_loss_at_equal_time")
            cells = [seed, "validation sample" if split == "sampled" else "held-out plays",
                     f"{fig['dense_base_loss']:.4f}" if "dense_base_loss" in fig else "-",
                     f"{n:,.0f}" if n else "-"]
            cells += [cell(fig, reference_key(i, r)) for i, r in enumerate(refs)]
            cells += [f"{equal:.4f}" if equal is not None else "-",
                      cell(fig, "compute_multiplier")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(found: dict, ratio: float, references: list[int], png: Path) -> None:
    """Final loss of each run against its wall-clock in dense steps (a default step costs
    `ratio` dense steps), one panel per seed: where the default's curve crosses dense's
    reference losses is the time to dense quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(found["sampled"])
    fig, axes = plt.subplots(1, len(seeds), figsize=(6 * len(seeds), 4.2), squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        for side, cost in (("default", ratio), ("dense", 1.0)):
            points = sorted(found["sampled"][seed].get(side, {}).items())
            if points:
                ax.plot([n * cost for n, _ in points], [v for _, v in points], marker="o",
                        label=f"{side} (one run per point)", linestyle="--" if side == "dense"
                        else "-")
        for ref in references:
            if ref in found["sampled"][seed].get("dense", {}):
                ax.axhline(found["sampled"][seed]["dense"][ref], color="grey", linewidth=0.8,
                           linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("wall-clock, in dense steps")
        ax.set_title(f"seed {seed}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final validation loss")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


# --- the command line ---
def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x [{min(values):.2f}, {max(values):.2f}]"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("runs", "time", "report"):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True, help="the folder of the runs and timings")
        s.add_argument("--data_file", default=None if name == "report" else
                       "../shared/data/shakespeare")
        if name != "report":
            s.add_argument("--default_flags", default="",
                           help="himoe train flags of the default side (none: the default)")
            s.add_argument("--dense_flags", default="--router dense")
    runs, timing = sub.choices["runs"], sub.choices["time"]
    runs.add_argument("--seeds", default="1337,1338")
    runs.add_argument("--default_steps", default=DEFAULT_STEPS)
    runs.add_argument("--dense_steps", default=DENSE_STEPS)
    runs.add_argument("--jobs", type=int, default=2, help="runs at a time")
    runs.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    runs.add_argument("--eval_interval", type=int, default=250)
    runs.add_argument("--eval_iters", type=int, default=20)
    timing.add_argument("--repeats", type=int, default=5, help="timed A B pairs")
    timing.add_argument("--process_steps", type=ints, default=list(PROCESS_STEPS),
                        help="SHORT,LONG --max_iters of the two processes of each side")
    report = sub.choices["report"]
    report.add_argument("--reference_steps", default=REFERENCE_STEPS,
                        help="dense run lengths whose loss the default must reach; the "
                        "first is also the equal-time and compute-multiplier length")
    report.add_argument("--md", help="write the table here")
    report.add_argument("--json", help="write every figure here")
    report.add_argument("--png", help="draw the runs' final losses against wall-clock")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"runs": cmd_runs, "time": cmd_time, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
