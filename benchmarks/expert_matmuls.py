"""The expert bank's matmuls, one expert at a time, against one matmul of the same FLOPs.

A balanced layer of the default gives each of its 48 experts ~170 of 8,192 rows. This times
the three products of one expert weight, forward (x @ w), input gradient (g @ w.T) and
weight gradient (x.T @ g), as the CPU path runs them (one torch.mm per expert), beside the
same product over all rows with one weight: at one thread and at two, so the table shows how
much of the routed part's excess is the small matmuls themselves and how much is splitting
each of them over the cores.

    python benchmarks/expert_matmuls.py [--repeats 20] [--spread 0.12]

Row counts are an even split with Gaussian noise of relative std --spread (0.12 gives a
busiest expert ~1.3x the mean, as trained default layers have). The two sides alternate
A B A B; each cell is the median [min, max] in ms, the ratio per repeat.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = ((256, 384), (384, 256))  # the default's two expert weights: D -> F, F -> D
PRODUCTS = ("forward", "input gradient", "weight gradient")


def row_counts(experts: int, rows: int, spread: float, seed: int = 0) -> list[int]:
    """`experts` counts summing to `rows`: an even share each, times 1 + spread * N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    share_E = (1 + spread * torch.randn(experts, generator=gen)).clamp_min(0.1)
    counts_E = (share_E / share_E.sum() * rows).floor().long()
    counts_E[: rows - int(counts_E.sum())] += 1
    return counts_E.tolist()


def product_pair(product: str, counts: list[int], d_in: int, d_out: int):
    """(per-expert loop, one matmul) closures computing `product` for these row counts."""
    rows, experts = sum(counts), len(counts)
    x, g = torch.randn(rows, d_in), torch.randn(rows, d_out)
    w_EIO, w_IO = torch.randn(experts, d_in, d_out), torch.randn(d_in, d_out)
    segments, start = [], 0
    for e, n in enumerate(counts):
        segments.append((e, slice(start, start + n)))
        start += n
    y_out, dx_out = torch.empty(rows, d_out), torch.empty(rows, d_in)
    dw_out = torch.empty_like(w_EIO)

    if product == "forward":
        def loop():
            for e, r in segments:
                torch.mm(x[r], w_EIO[e], out=y_out[r])
        return loop, lambda: torch.mm(x, w_IO)
    if product == "input gradient":
        def loop():
            for e, r in segments:
                torch.mm(g[r], w_EIO[e].t(), out=dx_out[r])
        return loop, lambda: torch.mm(g, w_IO.t())

    def loop():
        for e, r in segments:
            torch.mm(x[r].t(), g[r], out=dw_out[e])
    return loop, lambda: torch.mm(x.t(), g)


def measure(counts: list[int], threads: tuple[int, ...], repeats: int,
            warmup: int = 2) -> list[dict]:
    """One row per (threads, weight shape, product): both sides' times (ms), alternating."""
    rows = []
    before = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            for d_in, d_out in SHAPES:
                for product in PRODUCTS:
                    loop, single = product_pair(product, counts, d_in, d_out)
                    times = {"loop": [], "single": []}
                    for i in range(warmup + repeats):
                        for side, fn in (("loop", loop), ("single", single)):
                            t0 = time.perf_counter()
                            fn()
                            if i >= warmup:
                                times[side].append(1000 * (time.perf_counter() - t0))
                    rows.append({"threads": n, "shape": f"{d_in} -> {d_out}",
                                 "product": product, **times})
    finally:
        torch.set_num_threads(before)
    return rows


def cell(values: list[float], digits: int = 1) -> str:
    return (f"{statistics.median(values):.{digits}f} "
            f"[{min(values):.{digits}f}, {max(values):.{digits}f}]")


def report(rows: list[dict]) -> list[str]:
    lines = ["| threads | weight | product | one matmul per expert (ms) | one matmul (ms) | "
             "ratio |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = [a / b for a, b in zip(r["loop"], r["single"])]
        lines.append(f"| {r['threads']} | {r['shape']} | {r['product']} | {cell(r['loop'])} | "
                     f"{cell(r['single'])} | {cell(ratio, 2)}x |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--spread", type=float, default=0.12)
    p.add_argument("--experts", type=int, default=48)
    p.add_argument("--rows", type=int, default=8192, help="4,096 tokens x 2 experts each")
    args = p.parse_args(argv)
    counts = row_counts(args.experts, args.rows, args.spread)
    print(f"rows per expert: mean {args.rows / args.experts:.0f}, busiest {max(counts)}")
    print("\n".join(report(measure(counts, (1, 2), args.repeats))))


if __name__ == "__main__":
    main()
