"""--fsdp: FSDP2 (fully_shard) of each Transformer block and of the root (embeddings with
the tied LM head, final LayerNorm). Parameters, gradients and AdamW's moments live as
dim-0 shards (DTensors); a block's full weights exist only while it runs.

Saves gather full tensors to rank 0 on the CPU, so checkpoints keep the single-process
layout; AdamW's state is converted between the name-keyed form of torch's state-dict API
and the index-keyed form of optimizer.state_dict() that train_state.pt holds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from himoe.model import HiMoEModel

FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: HiMoEModel, device: torch.device, world: int) -> None:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 under its first name
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:  # one all-gather per block, freed after its use
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_model_state(model: HiMoEModel) -> dict:
    """Collective; the full state_dict on rank 0, empty elsewhere."""
    return get_model_state_dict(model, options=FULL_ON_RANK0)


def full_optimizer_state(model: HiMoEModel, optimizer) -> dict:
    """Collective; on rank 0 the optimizer.state_dict() of one process (whole tensors,
    parameters by index); empty elsewhere."""
    by_name = get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0)
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(optimizer_names(model, optimizer))}
    return {"state": {index[n]: s for n, s in by_name["state"].items()},
            "param_groups": [g | {"params": [index[n] for n in g["params"]]}
                             for g in by_name["param_groups"]]}


def load_optimizer_state(model: HiMoEModel, optimizer, state: dict) -> None:
    """Every rank passes the whole state (read from train_state.pt) and keeps its shards."""
    names = optimizer_names(model, optimizer)
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [g | {"params": [names[i] for i in g["params"]]}
                                for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True))


def optimizer_names(model: nn.Module, optimizer) -> list[str]:
    """Parameter names in optimizer order (the index order of optimizer.state_dict())."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
