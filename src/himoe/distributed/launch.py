"""Joining a torchrun job: the parallel mode and the process group.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address of every process;
without them himoe trains in one process as before.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from himoe.distributed.plan import Parallel
from himoe.errors import UserError


def choose_mode(args, world: int) -> str:
    fsdp, ep = getattr(args, "fsdp", False), getattr(args, "expert_parallel", 1)
    if ep < 1:
        raise UserError(f"--expert_parallel must be >= 1, got {ep}")
    if fsdp and ep > 1:
        raise UserError("--fsdp and --expert_parallel are separate modes; pick one")
    if (fsdp or ep > 1) and world == 1:
        flag = "--fsdp" if fsdp else f"--expert_parallel {ep}"
        raise UserError(f"{flag} needs several processes; launch with `torchrun "
                        f"--nproc_per_node={max(ep, 2)} -m himoe train ...`")
    if ep > 1 and ep != world:
        raise UserError(f"--expert_parallel {ep} needs as many processes, torchrun started "
                        f"{world}; pass --nproc_per_node={ep} (times --nnodes)")
    if fsdp:
        return "fsdp"
    if ep > 1:
        return "expert_parallel"
    return "ddp" if world > 1 else "single"


@contextlib.contextmanager
def launched(args):
    """The Parallel of this process; joins (and finally leaves) the process group when
    started by torchrun. NCCL where the run uses CUDA GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mode = choose_mode(args, world)
    grad_accum = getattr(args, "grad_accum", 1)
    if world == 1:
        yield Parallel(mode, grad_accum)
        return
    use_cuda = getattr(args, "device", "auto") != "cpu" and torch.cuda.is_available()
    if use_cuda:  # "cuda" then means this process's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield Parallel(mode, grad_accum, rank=dist.get_rank(), world=dist.get_world_size())
    finally:
        dist.destroy_process_group()
