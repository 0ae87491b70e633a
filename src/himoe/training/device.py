"""Where training and evaluation run: the device, the compute dtype and its autocast."""

from __future__ import annotations

import contextlib

import torch

from himoe.config import RunConfig
from himoe.errors import UserError


def resolve_device(run: RunConfig) -> tuple[torch.device, torch.dtype]:
    """(device, compute dtype). Weights stay fp32; a lower compute dtype runs under autocast.
    bf16 is the default on CUDA only: on CPUs it is far slower than fp32."""
    if run.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; "
                        "use --device cpu or auto")
    use_cuda = run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    name = run.dtype if run.dtype != "auto" else ("bfloat16" if use_cuda else "float32")
    return device, getattr(torch, name)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
