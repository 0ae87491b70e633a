import importlib.util
from pathlib import Path

import torch

from himoe.config import HiMoEConfig

ROOT = Path(__file__).resolve().parents[1]

# Tests use tiny models: one thread avoids spin-waiting when the machine is busy.
torch.set_num_threads(1)


def tiny_config(**overrides) -> HiMoEConfig:
    """A model small enough for a test to train in seconds on a CPU."""
    base = dict(n_embd=32, n_layer=2, n_head=2, block_size=16, num_moes=3, num_experts=4,
                dropout=0.0, batch_size=4, max_iters=8, eval_interval=4, eval_iters=2,
                warmup_iters=2, vocab_size=20, sample_tokens=60, device="cpu")
    base.update(overrides)
    return HiMoEConfig(**base).validate()



def load_benchmark(name: str):
    """benchmarks/NAME.py as a module: the scripts are not a package."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
