"""How many experts get tokens per training step, in `himoe train` (Trainer) and in
`himoe bench`'s in-process training side, both on --preset himoe-card from the same seed:
why the two measured different speeds (docs/performance.md). Counts, not timings.

    python benchmarks/active_experts.py
"""

import dataclasses
import io
import statistics
import tempfile

import torch

import himoe.training.trainer as T
from himoe.bench import throughput as bench
from himoe.cli.presets import preset_values
from himoe.config import HiMoEConfig
from himoe.training.trainer import Trainer

torch.set_num_threads(1)



def median_per_layer(counts: list[list[int]]) -> list[float]:
    return [statistics.median(c[i] for c in counts) for i in range(len(counts[0]))]


def in_trainer(steps: int = 45) -> list[list[int]]:
    cfg = dataclasses.replace(HiMoEConfig(), **preset_values("himoe-card", {}), device="cpu",
                              max_iters=steps, eval_interval=steps, eval_iters=1,
                              sample_tokens=1, model_dir=tempfile.mkdtemp() + "/m").validate()
    trainer = Trainer(cfg, out=io.StringIO())
    counts, step = [], T.train_step

    def counting_step(model, *args, **kwargs):
        loss = step(model, *args, **kwargs)
        counts.append(bench.experts_with_tokens(model))
        return loss

    T.train_step = counting_step
    trainer.train()
    return counts


def in_bench(steps: int = 17) -> list[list[int]]:
    data, tok = bench.hamlet()
    settings = bench.Settings(repeats=5, steps=3, warmup=2, threads=1, smoke=False)
    cfg = bench.card_config(tok.vocab_size, settings)
    side = bench.TrainSide(bench.build(cfg), cfg)
    counts = []
    for x_BT, y_BT in bench.sample_batches(data, cfg, steps, seed=0):
        side.step(x_BT, y_BT)
        counts.append(bench.experts_with_tokens(side.model))
    return counts


print("himoe train, steps 6-45: experts with tokens per layer (median):",
      median_per_layer(in_trainer()[5:]))
print("himoe bench's training side, steps 3-17 (its warm-up, then 5 x 3 timed):",
      median_per_layer(in_bench()[2:]))
