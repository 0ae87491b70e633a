"""SPEC: names parts of a saved model with the 1-based numbers of its file names.

    backbone                 embeddings, attention, LayerNorms (backbone.pt)
    layerL                   MoE layer L: its routers and all its experts
    layerL.router            its level-1 router ([layer_LL_]main_router.pt)
    layerL.groupG            group G of layer L: its level-2 router and its experts
    layerL.groupG.router     group G's level-2 router (moe_expert_00G/router.pt); routers
                             with per-group router files only (hierarchical), the others
                             have one router file per layer
    layerL.groupG.expertJ    expert J of group G (moe_expert_00G/model_00J.pt)
    layerL.shared            layer L's shared expert ([layer_LL_]shared_expert.pt), where
                             the model has one; `layerL` alone names its routers and routed
                             experts, not it

Several parts are separated by commas. Each part is a set of weight files, so every command
that takes a SPEC works on files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from himoe.checkpoint import card_layout
from himoe.config import HiMoEConfig
from himoe.errors import UserError
from himoe.model.routers.registry import router_spec

PATTERN = re.compile(r"layer(\d+)(?:\.group(\d+))?(?:\.(router|shared|expert(\d+)))?")
EXAMPLES = ("e.g. layer1.group2.expert3, layer1.group2.router, layer1.router, layer1.shared, "
            "layer1 or backbone")


SHARED = "shared"  # describe_file's expert of a shared expert file


@dataclass(frozen=True)
class Part:
    layer: int | None  # 0-based; None: the backbone
    group: int | None = None  # 0-based
    expert: int | None = None  # 0-based, inside the group
    router: bool = False
    shared: bool = False


def parse_part(text: str, cfg: HiMoEConfig, flag: str) -> Part:
    text = text.strip()
    if text == "backbone":
        return Part(None)
    m = PATTERN.fullmatch(text)
    if m is None:
        raise UserError(f"{flag} {text!r} is not a SPEC; name a part as {EXAMPLES}")
    spec = router_spec(cfg.router)
    if spec.dense:
        raise UserError(f"{flag} {text!r}: this model is dense (no experts or routers); only "
                        "'backbone' names a part of it")
    layer, group, kind, expert = m.groups()
    limits = (f"this model has layers 1-{cfg.n_layer}, groups 1-{cfg.num_moes} and experts "
              f"1-{cfg.num_experts}")
    for name, value, top in (("layer", layer, cfg.n_layer), ("group", group, cfg.num_moes),
                             ("expert", expert, cfg.num_experts)):
        if value is not None and not 1 <= int(value) <= top:
            raise UserError(f"{flag} {text!r}: there is no {name} {int(value)}; {limits}")
    if kind and kind.startswith("expert") and group is None:
        raise UserError(f"{flag} {text!r}: an expert is named by its group, e.g. "
                        f"layer{layer}.group1.{kind}")
    if expert is not None and int(expert) > cfg.group_sizes(int(layer) - 1)[int(group) - 1]:
        raise UserError(f"{flag} {text!r}: group {group} of layer {layer} has experts "
                        f"1-{cfg.group_sizes(int(layer) - 1)[int(group) - 1]}")
    if kind == "shared" and (group is not None or not cfg.shared_hidden):
        raise UserError(f"{flag} {text!r}: " + (
            f"a shared expert belongs to its layer, name it layer{layer}.shared"
            if group is not None else "this model has no shared expert (--shared_fraction 0)"))
    if kind == "router" and group is not None and not spec.group_routers:
        raise UserError(f"{flag} {text!r}: the {cfg.router} router has one router file per "
                        f"layer; name it layer{layer}.router")
    return Part(int(layer) - 1, None if group is None else int(group) - 1,
                None if expert is None else int(expert) - 1, kind == "router",
                kind == "shared")


def parse_spec(text: str, cfg: HiMoEConfig, flag: str) -> list[Part]:
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise UserError(f"{flag} is empty; name at least one part, {EXAMPLES}")
    return [parse_part(p, cfg, flag) for p in parts]


def part_files(part: Part, cfg: HiMoEConfig) -> list[str]:
    """The weight files (relative paths) that make up `part`."""
    if part.layer is None:
        return ["backbone.pt"]
    L, group_routers = part.layer, router_spec(cfg.router).group_routers
    if part.shared:
        return [card_layout.shared_expert_file(cfg, L)]
    if part.expert is not None:
        return [card_layout.expert_file(cfg, L, part.group, part.expert)]
    if part.router:
        if part.group is None:
            return [card_layout.main_router_file(cfg, L)]
        return [card_layout.group_router_file(cfg, L, part.group)]
    groups = range(cfg.num_moes) if part.group is None else [part.group]
    files = [card_layout.main_router_file(cfg, L)] if part.group is None else []
    for g in groups:
        if group_routers:
            files.append(card_layout.group_router_file(cfg, L, g))
        files += [card_layout.expert_file(cfg, L, g, j) for j in range(cfg.group_sizes(L)[g])]
    return files


def spec_files(text: str, cfg: HiMoEConfig, flag: str) -> list[str]:
    """The files a comma-separated SPEC names, in order, each once."""
    files: dict[str, None] = {}
    for part in parse_spec(text, cfg, flag):
        files.update(dict.fromkeys(part_files(part, cfg)))
    return list(files)


def weight_files(cfg: HiMoEConfig) -> list[str]:
    """Every weight file of a model with this configuration."""
    files = ["backbone.pt"]
    if not router_spec(cfg.router).dense:
        for layer in range(cfg.n_layer):
            files += part_files(Part(layer), cfg)
            if cfg.shared_hidden:
                files.append(card_layout.shared_expert_file(cfg, layer))
    return files


def describe_file(rel: str, cfg: HiMoEConfig) -> tuple[int | None, int | None,
                                                      int | str | None]:
    """(layer, group, expert), 1-based, of a weight file; None where it does not apply (a
    router has no expert number, a layer router no group); a shared expert is expert
    "shared" of no group."""
    for layer in range(cfg.n_layer):
        if rel == card_layout.main_router_file(cfg, layer):
            return layer + 1, None, None
        if rel == card_layout.shared_expert_file(cfg, layer):
            return layer + 1, None, SHARED
        for g, size in enumerate(cfg.group_sizes(layer)):
            if rel == card_layout.group_router_file(cfg, layer, g):
                return layer + 1, g + 1, None
            for j in range(size):
                if rel == card_layout.expert_file(cfg, layer, g, j):
                    return layer + 1, g + 1, j + 1
    return None, None, None
