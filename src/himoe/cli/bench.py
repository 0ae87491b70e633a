"""`himoe bench`: its flags and code are himoe.bench.throughput's (`himoe bench --help`)."""

from __future__ import annotations


def cmd_bench(args) -> int:
    from himoe.bench.throughput import main

    return main(args.bench_argv, prog="himoe bench")


def add_parser(sub) -> None:
    # The flags belong to himoe.bench.throughput (--help included): main() passes them on.
    bench = sub.add_parser("bench", add_help=False,
                           help="speed and memory against the baselines "
                                "(`himoe bench --help` for its flags)")
    bench.set_defaults(func=cmd_bench)
