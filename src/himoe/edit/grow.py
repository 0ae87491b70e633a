"""`himoe experts add`: one more expert in one group of a saved hierarchical model.

On disk that is one new file (the group's next model_00K.pt), one wider file (the group's
level-2 router gains a row), and a new config.json (group_experts records the sizes). In
memory every group keeps num_experts slots (the largest group), so the stacked tensors and
the optimiser's moments in train_state.pt change layout: they are moved slot by slot so that
`--resume` goes on exactly where training stopped, with zero moments for the new expert.
Every other file is copied byte for byte, in one atomic save (himoe.edit.surgery.rewrite).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from himoe.checkpoint import card as checkpoint
from himoe.checkpoint import card_layout
from himoe.config import HiMoEConfig
from himoe.edit.slots import (
    Sources,
    group_router,
    moved_train_state,
    resized_config,
    resized_writers,
)
from himoe.edit.surgery import current_manifest, rewrite, torch_writer
from himoe.errors import UserError
from himoe.model.routers.registry import BALANCE_BIAS, WEIGHT, router_spec


def parse_init(text: str, size: int) -> int | None:
    """--init random -> None; copy:J (1-based, an expert of the same group) -> J - 1."""
    if text == "random":
        return None
    m = re.fullmatch(r"copy:(\d+)", text)
    if m is None:
        raise UserError(f"--init {text!r} is not 'random' or 'copy:J'; e.g. --init copy:2 "
                        "starts the new expert as a copy of expert 2 of the same group")
    j = int(m[1])
    if not 1 <= j <= size:
        raise UserError(f"--init {text}: the group has experts 1-{size}; name one of them")
    return j - 1


def grown_config(cfg: HiMoEConfig, layer: int, group: int) -> HiMoEConfig:
    """cfg with one more expert in group `group` of layer `layer` (0-based)."""
    sizes = [cfg.group_sizes(i) for i in range(cfg.n_layer)]
    sizes[layer][group] += 1
    return resized_config(cfg, sizes)


def new_expert_state(cfg: HiMoEConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A fresh expert file, initialised as himoe initialises every expert."""
    D, F = cfg.n_embd, cfg.ffn_hidden
    return {"fc1.weight": torch.randn(F, D, generator=gen) * 0.02,
            "fc1.bias": torch.zeros(F),
            "fc2.weight": torch.randn(D, F, generator=gen) * (0.02 / (2 * cfg.n_layer) ** 0.5),
            "fc2.bias": torch.zeros(D)}


def widened_router(sd: dict, source: int | None, gen: torch.Generator) -> dict:
    """The group router with one more row: a copy of expert `source`'s row, or a fresh one
    (std 0.02, as at initialisation). A copied row starts the new expert as its source's
    twin: the two split that row's tokens as training separates them."""
    w_MD = sd[WEIGHT]
    row_D = w_MD[source].clone() if source is not None else torch.randn(
        w_MD.shape[1], generator=gen) * 0.02
    out = {WEIGHT: torch.cat([w_MD, row_D[None].to(w_MD.dtype)])}
    if BALANCE_BIAS in sd:
        bias = sd[BALANCE_BIAS]
        start = bias[source] if source is not None else bias.new_zeros(())
        out[BALANCE_BIAS] = torch.cat([bias, start.view(1)])
    return out


def same_places(cfg: HiMoEConfig) -> Sources:
    """Every expert of cfg keeps its (group, index); a new one comes after them."""
    return lambda layer, g: list(range(cfg.group_sizes(layer)[g]))


def grown_train_state(state: dict, old: HiMoEConfig, new: HiMoEConfig) -> dict:
    """train_state.pt with the optimiser's moments moved to the new slot layout: every
    expert keeps its (group, index), the new one starts at zero."""
    return moved_train_state(state, old, new, same_places(old))


def add_expert(model_dir: Path, layer: int, group: int, init: str, seed: int) -> str:
    """Add an expert to group `group` of MoE layer `layer` (1-based, as in the file names);
    returns one line saying what was written."""
    model_dir = Path(model_dir)
    cfg, vocab, step = checkpoint.read_config(model_dir)
    if not router_spec(cfg.router).group_routers:
        raise UserError(f"{model_dir} uses the {cfg.router!r} router, which has no per-group "
                        "router to widen; `experts add` works on hierarchical models (the "
                        "card's)")
    for name, value, top in (("--layer", layer, cfg.n_layer), ("--group", group, cfg.num_moes)):
        if not 1 <= value <= top:
            raise UserError(f"{name} {value} does not exist; this model has 1-{top}")
    L, G = layer - 1, group - 1
    size = cfg.group_sizes(L)[G]
    source = parse_init(init, size)
    current_manifest(model_dir)  # refuse a damaged directory before any work
    new_cfg = grown_config(cfg, L, G)
    gen = torch.Generator().manual_seed(seed)
    expert_rel = card_layout.expert_file(cfg, L, G, size)
    router_rel = card_layout.group_router_file(cfg, L, G)
    router = group_router(model_dir, cfg, L, G)
    if source is None:
        expert_writer = torch_writer(new_expert_state(cfg, gen))
    else:  # bytes as they are: an int8 expert stays int8
        expert_writer = checkpoint.copy_writer(model_dir, card_layout.expert_file(cfg, L, G,
                                                                                  source))
    writers = {expert_rel: expert_writer,
               router_rel: torch_writer(widened_router(router, source, gen)),
               **resized_writers(model_dir, cfg, new_cfg, vocab, step, same_places(cfg))}
    rewrite(model_dir, writers)
    how = "random initialisation" if source is None else f"a copy of expert {source + 1}"
    return (f"added expert {size + 1} to group {group} of layer {layer} ({how}): wrote "
            f"{expert_rel} and widened {router_rel} to {size + 1} experts")
