"""Where a training step's time goes: the default model against its dense-equivalent.

`himoe bench --only train` gives the ratio of whole processes; this script splits one
training step of each side into the phases of `train_step` (forward and backward, gradient
clipping, AdamW, zeroing and the selection-bias update), and splits one MoE layer of the
default into its router, its routed part (router, dispatch, expert bank, combine) and a
dense FFN as wide as the experts a token runs (top_k_experts x expert_hidden): that FFN does
the routed part's expert FLOPs with one large matmul per weight, so their difference is
what the routing and the 48 small matmuls cost.

    python benchmarks/step_phases.py [--repeats 40] [--warmup 5] [--threads 2]
    python benchmarks/step_phases.py --batch_sizes 8,16,32,64,128 [--png sweep.png]

Both sides train on the shipped Hamlet with the learning-rate schedule of `himoe train`, so
the timed steps (6-45 by default, as in `himoe bench --only train`) route as a user's do.
Sides alternate A B A B in one process; each cell is the median [min, max] in ms. The last
line is the ratio the whole step would reach if each MoE layer's routed part cost no more
than that dense FFN: an upper bound on what a faster dispatch alone can give.

With --batch_sizes the same measurement runs at each batch size in turn (sides still
alternating within each), and one table gives the step ratio and that bound against the
rows each expert gets: what grows with the batch (the matmuls' rows) against what a step
pays per expert whatever the batch (AdamW and clipping over every expert's weights, the
per-expert calls).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from himoe.bench.throughput import TrainSide, build, experts_with_tokens, hamlet, sample_batches
from himoe.config import HiMoEConfig
from himoe.distributed.plan import Parallel
from himoe.model.experts import DenseFFN
from himoe.model.grad_sink import zero_grads
from himoe.training.allocator import keep_freed_memory
from himoe.training.optim import bias_rate_at, set_scheduled_lr

PHASES = ("forward+backward", "clip", "AdamW", "zero+bias", "step")
LAYER_PARTS = ("router", "routed part", "dense FFN of the routed FLOPs")


class Side(TrainSide):
    """`himoe bench`'s training side (model, optimiser and sinks as `himoe train` builds
    them), with train_step's phases timed one by one."""

    def __init__(self, cfg: HiMoEConfig):
        super().__init__(build(cfg, cfg.seed), cfg)
        self.parallel = Parallel()

    def step_ms(self, x_BT: torch.Tensor, y_BT: torch.Tensor) -> list[float]:
        """train_step's phases, timed one by one (train_step itself runs them back to back)."""
        set_scheduled_lr(self.optimizer, self.steps_done, self.cfg)
        bias_rate_scale = bias_rate_at(self.steps_done, self.cfg)
        self.steps_done += 1
        marks = [time.perf_counter()]
        self.parallel.forward_backward(self.model, x_BT, y_BT)
        marks.append(time.perf_counter())
        self.parallel.clip_grad_norm(self.params, self.cfg.grad_clip, self.optimizer)
        marks.append(time.perf_counter())
        self.optimizer.step()
        self.optimizer.grad_scale = None
        marks.append(time.perf_counter())
        zero_grads(self.model, self.optimizer)
        if self.cfg.bias_update_rate:
            self.model.update_balance_biases(bias_rate_scale)
        marks.append(time.perf_counter())
        phases = [1000 * (b - a) for a, b in zip(marks, marks[1:])]
        return phases + [sum(phases)]


def layer_parts_ms(side: Side, x_TD: torch.Tensor, same_flops: DenseFFN) -> list[float]:
    """Forward and backward of the first block's router alone, its whole MoE layer and
    `same_flops` (a dense FFN of the routed part's expert FLOPs), each on the same tokens."""
    moe = side.model.moe_layers[0]

    def router():
        routing = moe.router(x_TD)
        return routing.weights_TK.sum() + sum(routing.aux.values())

    def routed():
        y = moe(x_TD.unsqueeze(0))
        return y.sum() + sum(moe.last_aux.values())

    # A training-mode forward adds to the selection bias's counts: put them back, so these
    # timings leave the next training step as it would have been.
    buffers = [(b, b.clone()) for b in moe.router.buffers()]
    out = []
    for part in (router, routed, lambda: same_flops(x_TD).sum()):
        t0 = time.perf_counter()
        part().backward()
        zero_grads(side.model, side.optimizer)
        same_flops.zero_grad(set_to_none=True)
        x_TD.grad = None
        out.append(1000 * (time.perf_counter() - t0))
    for buffer, saved in buffers:
        buffer.copy_(saved)
    return out


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}, {max(values):.1f}]"


def measure(cfg_moe: HiMoEConfig, cfg_dense: HiMoEConfig, repeats: int, warmup: int) -> dict:
    """Per-phase and per-part times (ms) of each repeat after the warm-up."""
    data, _ = hamlet()
    sides = {"default": Side(cfg_moe), "dense": Side(cfg_dense)}
    batches = sample_batches(data, cfg_moe, warmup + repeats, seed=0)
    steps = {name: [] for name in sides}
    parts, active = [], []
    torch.manual_seed(0)
    same_flops = DenseFFN(cfg_moe.n_embd, cfg_moe.top_k_experts * cfg_moe.ffn_hidden,
                          cfg_moe.n_layer)
    x_TD = torch.randn(cfg_moe.batch_size * cfg_moe.block_size, cfg_moe.n_embd,
                       generator=torch.Generator().manual_seed(0), requires_grad=True)
    for i, (x_BT, y_BT) in enumerate(batches):
        for name, side in sides.items():
            phases = side.step_ms(x_BT, y_BT)
            if i >= warmup:
                steps[name].append(phases)
        if i >= warmup:  # before layer_parts_ms overwrites the last routing
            active.append(experts_with_tokens(sides["default"].model))
        ms = layer_parts_ms(sides["default"], x_TD, same_flops)
        if i >= warmup:
            parts.append(ms)
    return {"steps": steps, "parts": parts, "n_layer": cfg_moe.n_layer, "active": active}


def ratios_and_bounds(result: dict) -> tuple[list[float], list[float]]:
    """Per repeat: the step ratio (dense ms / default ms), and the same ratio with each MoE
    layer's routed part priced at the same-FLOPs dense FFN's cost, the rest as is."""
    moe, dense = result["steps"]["default"], result["steps"]["dense"]
    ratios = [d[-1] / m[-1] for m, d in zip(moe, dense)]
    excess = [result["n_layer"] * (p[1] - p[2]) for p in result["parts"]]
    bounds = [d[-1] / (m[-1] - e) for m, d, e in zip(moe, dense, excess)]
    return ratios, bounds


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x [{min(values):.2f}, {max(values):.2f}]"


def report(result: dict) -> list[str]:
    """The two markdown tables and the bound, as lines."""
    moe, dense = result["steps"]["default"], result["steps"]["dense"]
    lines = ["| phase | default (ms) | dense-equivalent (ms) | difference (ms, median) |",
             "| --- | --- | --- | --- |"]
    for j, phase in enumerate(PHASES):
        a, b = [r[j] for r in moe], [r[j] for r in dense]
        lines.append(f"| {phase} | {cell(a)} | {cell(b)} | "
                     f"{statistics.median(x - y for x, y in zip(a, b)):+.1f} |")
    ratios, bounds = ratios_and_bounds(result)
    per_layer = [statistics.median(a) for a in zip(*result["active"])]
    lines += ["", "Experts with tokens in the timed steps, median per layer: "
                  + " / ".join(f"{n:g}" for n in per_layer), "",
              f"Step ratio (dense ms / default ms, per repeat): {spread(ratios)}", ""]
    parts = result["parts"]
    lines += ["| one MoE layer of the default, forward+backward | ms |", "| --- | --- |"]
    lines += [f"| {name} | {cell([p[j] for p in parts])} |" for j, name in enumerate(LAYER_PARTS)]
    lines += ["", f"If the routed part cost what the dense FFN of its FLOPs does: "
                  f"{spread(bounds)}"]
    return lines


def rows_per_expert(cfg: HiMoEConfig) -> float:
    """Mean rows an expert's matmuls get in one layer's step at even routing."""
    tokens = cfg.batch_size * cfg.block_size
    return tokens * cfg.top_k_groups * cfg.top_k_experts / cfg.total_experts


def sweep(cfg_moe: HiMoEConfig, cfg_dense: HiMoEConfig, batch_sizes: list[int], repeats: int,
          warmup: int) -> list[tuple[HiMoEConfig, dict]]:
    """measure() at each batch size in turn, fresh sides each time."""
    out = []
    for b in batch_sizes:
        moe, dense = (dataclasses.replace(c, batch_size=b).validate()
                      for c in (cfg_moe, cfg_dense))
        out.append((moe, measure(moe, dense, repeats, warmup)))
    return out


def sweep_report(runs: list[tuple[HiMoEConfig, dict]], default: HiMoEConfig,
                 png: Path | None = None) -> list[str]:
    """One row per batch size; with png, the ratio and the bound against rows per expert
    (medians, and a band from the first to the third quartile), the default's own batch
    size marked."""
    lines = ["| batch size | tokens a step | rows per expert (mean) | default step (ms) | "
             "dense step (ms) | step ratio | bound with the dispatch free |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    curves = []
    for cfg, result in runs:
        ratios, bounds = ratios_and_bounds(result)
        moe, dense = ([r[-1] for r in result["steps"][k]] for k in ("default", "dense"))
        lines.append(f"| {cfg.batch_size} | {cfg.batch_size * cfg.block_size:,} | "
                     f"{rows_per_expert(cfg):.0f} | {cell(moe)} | {cell(dense)} | "
                     f"{spread(ratios)} | {spread(bounds)} |")
        curves.append((rows_per_expert(cfg), ratios, bounds))
    if png is not None:
        plot_sweep(curves, default, png)
    return lines


def plot_sweep(curves: list[tuple[float, list[float], list[float]]], cfg: HiMoEConfig,
               png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [c[0] for c in curves]
    for j, (label, colour) in enumerate((("step ratio, as trained", "C0"),
                                          ("bound: routed part at dense-FFN cost", "C1"))):
        values = [c[1 + j] for c in curves]
        ax.plot(xs, [statistics.median(v) for v in values], marker="o", color=colour,
                label=label)
        # The middle half of the repeats: one slow repeat of a side stretches min-max to 4x.
        quartiles = [statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
                     for v in values]
        ax.fill_between(xs, [q[0] for q in quartiles], [q[2] for q in quartiles],
                        color=colour, alpha=0.2)
    ax.axhline(0.85, color="grey", ls="--", lw=1, label="target 0.85x")
    ax.axvline(rows_per_expert(cfg), color="grey", ls=":", lw=1,
               label=f"the default batch ({cfg.batch_size} x {cfg.block_size} tokens)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows per expert and layer in a step (mean)")
    ax.set_ylabel("default speed / dense-equivalent's (per step)")
    ax.set_ylim(0, 1.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--batch_sizes", help="comma list: one row per batch size instead")
    p.add_argument("--png", type=Path, help="with --batch_sizes: the sweep's chart")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `himoe train` does
    _, tok = hamlet()
    cfg = HiMoEConfig(vocab_size=tok.vocab_size).validate()
    dense = HiMoEConfig(vocab_size=tok.vocab_size, router="dense").validate()
    if args.batch_sizes:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        runs = sweep(cfg, dense, sizes, args.repeats, args.warmup)
        print("\n".join(sweep_report(runs, cfg, args.png)))
    else:
        print("\n".join(report(measure(cfg, dense, args.repeats, args.warmup))))


if __name__ == "__main__":
    main()
