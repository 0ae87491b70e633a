"""Changing how many experts the groups of a saved hierarchical model hold (`experts add`,
`experts prune`): the new configuration, and the optimiser's moments moved to the new slot
layout.

In memory every group has num_experts slots (the largest group), so a change of sizes moves
every stacked tensor's rows. Sources says where each new slot's row comes from: for layer L
and group g, a list with one entry per expert the group has afterwards, the expert's index
(0-based) before the change, or None for a new expert (its moments start at zero).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from himoe.checkpoint import card as checkpoint
from himoe.checkpoint import card_layout, safe_path
from himoe.config import HiMoEConfig
from himoe.edit.surgery import torch_writer
from himoe.errors import UserError
from himoe.model import HiMoEModel
from himoe.model.routers.registry import WEIGHT
from himoe.training.optim import build_optimizer

Sources = Callable[[int, int], list[int | None]]


def resized_config(cfg: HiMoEConfig, sizes: list[list[int]]) -> HiMoEConfig:
    """cfg with sizes[layer][group] experts in each group; num_experts becomes the largest
    group, and group_experts None again once every group has that many."""
    largest = max(max(row) for row in sizes)
    uniform = all(n == largest for row in sizes for n in row)
    return dataclasses.replace(cfg, num_experts=largest,
                               group_experts=None if uniform else sizes).validate()


def move_slots(t: torch.Tensor, key: str, old: HiMoEConfig, new: HiMoEConfig, layer: int,
               sources: Sources) -> torch.Tensor:
    """Tensor `t` of state_dict entry `key`, stacked over layer `layer`'s slots, in the new
    layout: each expert's row goes where sources puts it; new and empty slots are zero."""
    t_NM = card_layout.slots_NM(t, key, old)
    out_NM = t_NM.new_zeros(new.num_moes, new.num_experts, *t_NM.shape[2:])
    for g in range(new.num_moes):
        for j, src in enumerate(sources(layer, g)):
            if src is not None:
                out_NM[g, j] = t_NM[g, src]
    return out_NM if card_layout.stacked_NM(key) else out_NM.flatten(0, 1)


def moved_train_state(state: dict, old: HiMoEConfig, new: HiMoEConfig,
                      sources: Sources) -> dict:
    """train_state.pt with the optimiser's moments moved to the new slot layout; every
    other entry (step, data position, RNG) as it was, so --resume goes on exactly."""
    model = HiMoEModel(old)
    name_of = {id(p): name for name, p in model.named_parameters()}
    # The optimiser's state_dict numbers parameters in the order of its groups.
    order = [name_of[id(p)] for group in build_optimizer(model, old).param_groups
             for p in group["params"]]
    moved = {}
    for index, slot_state in state["optimizer"]["state"].items():
        key = order[index]
        layer = card_layout.slot_layer(old, key)
        if layer is None:
            moved[index] = {k: grown_over_groups(v, key, new) if isinstance(v, torch.Tensor)
                            else v for k, v in slot_state.items()}
            continue
        shape = tuple(model.get_parameter(key).shape)
        moved[index] = {k: move_slots(v, key, old, new, layer, sources)
                        if isinstance(v, torch.Tensor) and tuple(v.shape) == shape else v
                        for k, v in slot_state.items()}
    return state | {"optimizer": state["optimizer"] | {"state": moved}}


def grown_over_groups(t: torch.Tensor, key: str, new: HiMoEConfig) -> torch.Tensor:
    """A level-1 router tensor stacked over the groups (main_weight_ND: [N, ...]) with zero
    rows for the groups `merge --into` adds; any other tensor as it is."""
    if not key.endswith(".router.main_weight_ND") or t.dim() == 0 or t.shape[0] == new.num_moes:
        return t
    return torch.cat([t, t.new_zeros(new.num_moes - t.shape[0], *t.shape[1:])])


def group_router(model_dir: Path, cfg: HiMoEConfig, layer: int, group: int) -> dict:
    """The router file of group `group` of layer `layer` (0-based), checked to hold one row
    per expert of the group."""
    size, rel = cfg.group_sizes(layer)[group], card_layout.group_router_file(cfg, layer, group)
    sd = checkpoint.load_weight_file(model_dir, rel)
    if WEIGHT not in sd or sd[WEIGHT].shape[0] != size:
        raise UserError(f"{Path(model_dir) / rel} does not hold the {size}-row router of its "
                        "group; restore it before changing the group's experts")
    return sd


def resized_writers(model_dir: Path, old: HiMoEConfig, new: HiMoEConfig, vocab: list[str],
                    step: int, sources: Sources) -> dict:
    """The writers of config.json and, where the model has one, train_state.pt (moments
    moved by sources) for a model whose groups change size from `old` to `new`."""
    writers = {checkpoint.CONFIG_FILE: lambda f: f.write(checkpoint.config_bytes(new, vocab,
                                                                                 step))}
    if safe_path.lstat(model_dir, checkpoint.TRAIN_STATE_FILE) is not None:
        state = checkpoint.load_weight_file(model_dir, checkpoint.TRAIN_STATE_FILE, plain=False)
        writers[checkpoint.TRAIN_STATE_FILE] = torch_writer(moved_train_state(state, old, new,
                                                                              sources))
    return writers
