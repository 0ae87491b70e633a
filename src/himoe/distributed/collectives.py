"""Small collectives that are no-ops in a single process, so model code can call them."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of t over all ranks (t itself when alone). Every rank must call it at the
    same point: it is used only in training-mode forwards, which all ranks run in step.
    SUM then divide: gloo has no AVG."""
    world = world_size()
    if world == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world


def sum_over_ranks_(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def gather_rows(t: torch.Tensor) -> torch.Tensor | None:
    """Every rank's t (same shape on all) stacked along dim 0, on rank 0 (on the CPU);
    None on the other ranks."""
    world = world_size()
    if world == 1:
        return t.detach().cpu()
    parts = [torch.empty_like(t) for _ in range(world)] if dist.get_rank() == 0 else None
    dist.gather(t.detach().contiguous(), parts, dst=0)
    return torch.cat(parts).cpu() if parts is not None else None
