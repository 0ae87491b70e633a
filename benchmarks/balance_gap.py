"""Why a router balanced in training can show a larger MaxVio on held-out text.

MaxVio_global (max load / mean load - 1) is measured by `himoe train` on the validation
split, in eval mode, with the routers as they are at that step. The loss-free bias and the
Switch loss act on something else: the training batches, with dropout on, step after step.
This script separates the three differences:

    python benchmarks/balance_gap.py train MODEL_DIR '{"max_iters": 3000, ...}' [--threads 1]
        # a `himoe train` run (Trainer, the same code) that also keeps every MoE layer's
        # expert counts of every training step: MODEL_DIR.trace.npz
    python benchmarks/balance_gap.py measure MODEL_DIR [--batches 20] [--window 50]
        # MaxVio per layer of the saved model: training split / validation split, each in
        # eval mode and with dropout on (training mode, no update); with a trace, also the
        # load of the last training steps summed over --window steps, and per step

The training-mode rows count routing exactly as the bias update sees it; eval mode is what
the validation figure sees; the window row is the load averaged over time, which is what
the sign update drives towards the mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def max_violation(counts_LE: np.ndarray) -> np.ndarray:
    """himoe's MaxVio (max / mean - 1) of each row."""
    from himoe.analysis.balance import max_violation as of_one

    counts_LE = np.asarray(counts_LE, dtype=np.float64)
    flat_RE = counts_LE.reshape(-1, counts_LE.shape[-1])
    return np.array([of_one(torch.from_numpy(c)) for c in flat_RE]).reshape(counts_LE.shape[:-1])


def layer_counts(layer, num_experts: int) -> torch.Tensor:
    """How many tokens the router sent each expert in the layer's last forward (its
    choices, last_ids_TK, before any capacity limit: what the balancers count too)."""
    return torch.bincount(layer.last_ids_TK.reshape(-1), minlength=num_experts)


def train(model_dir: str, overrides: dict, threads: int) -> Path | None:
    """Trains MODEL_DIR; returns its trace, or None for a model without MoE layers (dense)."""
    from himoe.config import HiMoEConfig
    from himoe.training.trainer import Trainer

    torch.set_num_threads(threads)
    cfg = HiMoEConfig(**(overrides | {"model_dir": model_dir})).validate()
    trainer = Trainer.new(cfg)
    steps = []  # per training forward: one [layers, E] count table

    def record(layer_index: int):
        def hook(module, _inputs, _output):
            if module.training:
                if layer_index == 0:
                    steps.append([])
                steps[-1].append(layer_counts(module, cfg.total_experts))
        return hook

    for n, layer in enumerate(trainer.model.moe_layers.values()):
        layer.register_forward_hook(record(n))
    trainer.train()
    if not steps:  # dense: the same run, nothing to count
        return None
    out = Path(f"{model_dir}.trace.npz")
    np.savez(out, counts_SLE=torch.stack([torch.stack(s) for s in steps]).numpy())
    return out


@torch.no_grad()
def split_counts(model, data: torch.Tensor, batches: int, batch_size: int, block_size: int,
                 training_mode: bool) -> np.ndarray:
    """[layers, E] expert counts over `batches` fixed batches; training_mode: dropout on.
    The selection biases stay put either way: only an optimiser step's
    update_balance_biases moves them."""
    from himoe.data.batches import get_batch

    was_training = model.training
    model.train(training_mode)
    gen = torch.Generator().manual_seed(1)
    layers = list(model.moe_layers.values())
    counts = np.zeros((len(layers), model.cfg.total_experts))
    try:
        for _ in range(batches):
            x, y = get_batch(data, batch_size, block_size, gen)
            model(x, y)
            for n, layer in enumerate(layers):
                counts[n] += layer_counts(layer, counts.shape[1]).numpy()
    finally:
        model.train(was_training)
    return counts


def measure(model_dir: str, batches: int, window: int) -> list[list[str]]:
    from himoe.checkpoint.card import load_model
    from himoe.data.corpora import open_corpus, token_splits
    from himoe.data.tokenizers import tokenizer_for

    path = Path(model_dir)
    model, cfg, vocab, step = load_model(path)
    splits = token_splits(open_corpus(cfg.data_file), tokenizer_for(cfg, vocab, path),
                          cfg.block_size)
    rows = []
    for split, data in zip(("training split", "validation split"), splits):
        for mode, training_mode in (("eval mode", False), ("dropout on", True)):
            counts = split_counts(model, data, batches, cfg.batch_size, cfg.block_size,
                                  training_mode)
            rows.append([f"{split}, {mode}, {batches} batches",
                         *(f"{v:.2f}" for v in max_violation(counts))])
    trace = Path(f"{model_dir}.trace.npz")
    if trace.exists():
        counts_SLE = np.load(trace)["counts_SLE"]
        last = counts_SLE[-window:]
        rows.append([f"training steps, summed over the last {len(last)}",
                     *(f"{v:.2f}" for v in max_violation(last.sum(0)))])
        per_step = max_violation(last.transpose(1, 0, 2))  # [layers, steps]
        rows.append(["training steps, one at a time (mean of the same steps)",
                     *(f"{v:.2f}" for v in per_step.mean(-1))])
    print(f"{model_dir} (step {step}): MaxVio per layer")
    header = ["counted on", *(f"layer {i + 1}" for i in range(len(rows[0]) - 1))]
    for row in [header, ["---"] * len(header), *rows]:
        print("| " + " | ".join(row) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("model_dir")
    t.add_argument("overrides", help="JSON object of himoe train settings")
    t.add_argument("--threads", type=int, default=1)
    m = sub.add_parser("measure")
    m.add_argument("model_dir")
    m.add_argument("--batches", type=int, default=20)
    m.add_argument("--window", type=int, default=50)
    args = parser.parse_args(argv)
    if args.command == "train":
        trace = train(args.model_dir, json.loads(args.overrides), args.threads)
        print(f"trace: {trace}" if trace else "no MoE layers: no trace")
    else:
        measure(args.model_dir, args.batches, args.window)
    return 0


if __name__ == "__main__":
    sys.exit(main())
