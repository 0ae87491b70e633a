"""The card's file layout: which weight file holds which slice of which in-memory tensor.

In memory an MoE layer's experts are stacked tensors (w1_EDF, ...) and per-group router
state is stacked over the groups' expert slots (flat slot g * M + j); on disk each expert
and each router is its own file (himoe.checkpoint.card lists them). Save, load, --train_only,
`himoe experts add` and swap all ask this module, so the mapping is written once. Which
router state goes to which router file is the router type's (himoe.model.routers.registry).

A tensor stacked over slots is [N, M, ...] when its shape suffix starts with NM
(group_weight_NMD), else [N * M, ...] (w1_EDF, expert_bias_E).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from himoe.checkpoint.quantize import dequantize_state
from himoe.config import HiMoEConfig
from himoe.errors import UserError
from himoe.model.routers.registry import BALANCE_BIAS, router_spec

# An expert file's entries (nn.Linear's, so himoe.Expert loads one) and the stacked tensors
# they slice. The stacked matrices are [in, out] for the grouped matmul: files hold them
# transposed.
EXPERT_ENTRIES = (("fc1.weight", "w1_EDF"), ("fc1.bias", "b1_EF"), ("fc2.weight", "w2_EFD"),
                  ("fc2.bias", "b2_ED"))
TRANSPOSED = ("fc1.weight", "fc2.weight")
MOE_KEY = re.compile(r"blocks\.(\d+)\.ffn\.(router|experts)\.(.+)")  # router state may nest


def layer_prefix(cfg: HiMoEConfig, layer: int) -> str:
    return f"layer_{layer + 1:02d}_" if cfg.n_layer > 1 else ""


def main_router_file(cfg: HiMoEConfig, layer: int) -> str:
    return f"{layer_prefix(cfg, layer)}main_router.pt"


def group_dir(cfg: HiMoEConfig, layer: int, group: int) -> str:
    return f"{layer_prefix(cfg, layer)}moe_expert_{group + 1:03d}"


def group_router_file(cfg: HiMoEConfig, layer: int, group: int) -> str:
    return f"{group_dir(cfg, layer, group)}/router.pt"


def expert_file(cfg: HiMoEConfig, layer: int, group: int, expert: int) -> str:
    return f"{group_dir(cfg, layer, group)}/model_{expert + 1:03d}.pt"


def shared_expert_file(cfg: HiMoEConfig, layer: int) -> str:
    """The layer's shared expert (every token runs it): a DenseFFN's state_dict, so it loads
    into himoe.Expert on its own, as a routed expert's file does."""
    return f"{layer_prefix(cfg, layer)}shared_expert.pt"


SHARED_KEY = re.compile(r"blocks\.(\d+)\.shared_ffn\.(.+)")


def moe_key(layer: int, name: str) -> str:
    return f"blocks.{layer}.ffn.{name}"


@dataclass(frozen=True)
class Piece:
    """One entry of one weight file and the part of a model state_dict tensor it holds."""
    file: str
    entry: str  # its key in the file, e.g. "fc1.weight"
    key: str  # the model's state_dict key, e.g. "blocks.0.ffn.experts.w1_EDF"
    group: int | None = None  # None: the whole tensor; else slots of this group
    expert: int | None = None  # with group: this one slot; None: the group's first `size`
    size: int = 0  # the group's expert count: the rows a group's file holds


def stacked_NM(key: str) -> bool:
    return key.rsplit("_", 1)[-1].startswith("NM")


def slots_NM(t: torch.Tensor, key: str, cfg: HiMoEConfig) -> torch.Tensor:
    """A tensor stacked over slots as [N, M, ...]."""
    rest = t.shape[2:] if stacked_NM(key) else t.shape[1:]
    return t.reshape(cfg.num_moes, cfg.num_experts, *rest)


def layer_pieces(cfg: HiMoEConfig, layer: int, keys: Iterable[str]) -> list[Piece]:
    """Every entry of MoE layer `layer`'s files, in file order: its router file, its groups'
    router files, its experts. keys: state_dict keys of the model; a router type without
    main_entries saves each persistent state of its own under its name."""
    spec = router_spec(cfg.router)
    router = moe_key(layer, "router.")
    main = main_router_file(cfg, layer)
    entries = spec.main_entries if spec.main_entries is not None else [
        (k.removeprefix(router), k.removeprefix(router)) for k in keys if k.startswith(router)]
    pieces = [Piece(main, entry, router + name) for entry, name in entries]
    sizes = cfg.group_sizes(layer)
    for g, size in enumerate(sizes):
        pieces += [Piece(group_router_file(cfg, layer, g), entry, router + name, g, size=size)
                   for entry, name in spec.group_entries]
    for g, size in enumerate(sizes):
        for j in range(size):
            pieces += [Piece(expert_file(cfg, layer, g, j), entry,
                             moe_key(layer, f"experts.{name}"), g, j)
                       for entry, name in EXPERT_ENTRIES]
    return pieces


def layer_files(cfg: HiMoEConfig, layer: int,
                state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{file: state_dict} of MoE layer `layer` from the model's state. Each tensor is a copy
    of its own slice only, so a file never holds the whole stacked storage. Balancing biases
    are written only with loss-free balancing on; without, the files are the card's plain
    gates."""
    files: dict[str, dict[str, torch.Tensor]] = {}
    for p in layer_pieces(cfg, layer, state):
        if p.entry == BALANCE_BIAS and not cfg.bias_update_rate:
            continue
        t = state[p.key]
        if p.group is not None:
            t_NM = slots_NM(t, p.key, cfg)
            t = t_NM[p.group, p.expert] if p.expert is not None else t_NM[p.group, :p.size]
        if p.entry in TRANSPOSED:
            t = t.t()
        files.setdefault(p.file, {})[p.entry] = t.clone(memory_format=torch.contiguous_format)
    return files


def layer_state(cfg: HiMoEConfig, layer: int, expected: dict[str, torch.Tensor],
                read: Callable[[str], dict], where: str) -> dict[str, torch.Tensor]:
    """MoE layer `layer`'s state_dict entries from its files; the inverse of layer_files.
    expected: the model's state_dict (for shapes); read(file): that file's state_dict;
    where: the model directory, for messages.
    Empty slots of smaller groups are zeros (never routed to); a missing balancing bias is
    zeros (a plain gate swapped in)."""
    loaded: dict[str, dict] = {}
    whole: dict[str, torch.Tensor] = {}
    slots: dict[str, list[torch.Tensor | None]] = {}
    M = cfg.num_experts
    for p in layer_pieces(cfg, layer, expected):
        if p.file not in loaded:  # an int8 expert (himoe experts quantize) reads as fp32
            sd = read(p.file)
            loaded[p.file] = dequantize_state(sd, p.file) if p.expert is not None else sd
        sd = loaded[p.file]
        if p.group is None:
            whole[p.key] = (torch.zeros_like(expected[p.key]) if p.entry == BALANCE_BIAS and
                            p.entry not in sd else pick(sd, p.entry, p.file))
            continue
        parts = slots.setdefault(p.key, [None] * cfg.total_experts)
        if p.expert is not None:
            t = pick(sd, p.entry, p.file)
            parts[p.group * M + p.expert] = t.t() if p.entry in TRANSPOSED else t
            continue
        if p.entry == BALANCE_BIAS and p.entry not in sd:
            rows = torch.zeros(p.size, *slots_NM(expected[p.key], p.key, cfg).shape[2:])
        else:
            rows = pick(sd, p.entry, p.file)
            if rows.dim() == 0 or rows.shape[0] != p.size:
                raise UserError(f"{p.file} has {rows.shape[0] if rows.dim() else 0} rows but "
                                f"its group has {p.size} experts (config.json); restore the "
                                "router file that matches")
        parts[p.group * M:p.group * M + p.size] = list(rows)
    for key, parts in slots.items():
        stacked = stack_slots(parts, where, layer)
        whole[key] = stacked.view(cfg.num_moes, M, *stacked.shape[1:]) if stacked_NM(key) \
            else stacked
    return whole


def pick(sd: dict, entry: str, file: str) -> torch.Tensor:
    if entry not in sd:
        raise UserError(f"{file} has no '{entry}' entry; replace it with an expert file saved "
                        "by himoe")
    return sd[entry]


def stack_slots(parts: list[torch.Tensor | None], where: str, layer: int) -> torch.Tensor:
    """Stack one tensor per slot; None (an empty slot) becomes zeros of the same shape."""
    shapes = {tuple(p.shape) for p in parts if p is not None}
    if len(shapes) > 1:
        raise UserError(f"{where}: experts of layer {layer + 1} have different shapes "
                        f"{sorted(shapes)}; every expert of a layer must match")
    like = next(p for p in parts if p is not None)
    return torch.stack([torch.zeros_like(like) if p is None else p for p in parts])


def owner_files(cfg: HiMoEConfig, key: str) -> str | list[str]:
    """The weight file that holds state_dict entry `key`: one name for a whole tensor, or
    one per row (dim 0) for tensors stacked over slots or groups. A slot of a ragged group
    with no expert belongs to no file (""): it is kept as it is."""
    shared = SHARED_KEY.fullmatch(key)
    if shared is not None:
        return shared_expert_file(cfg, int(shared[1]))
    m = MOE_KEY.fullmatch(key)
    if m is None or router_spec(cfg.router).dense:
        return "backbone.pt"
    layer, M = int(m[1]), cfg.num_experts
    pieces = [p for p in layer_pieces(cfg, layer, [key]) if p.key == key]
    if not any(p.group is not None for p in pieces):
        return main_router_file(cfg, layer)
    owners = [""] * cfg.total_experts
    for p in pieces:
        if p.expert is not None:
            owners[p.group * M + p.expert] = p.file
        else:  # the group's file holds its row of every slot, the empty ones as padding
            owners[p.group * M:(p.group + 1) * M] = [p.file] * M
    return owners[::M] if stacked_NM(key) else owners


def slot_layer(cfg: HiMoEConfig, key: str) -> int | None:
    """The layer of a state_dict entry stacked over that layer's slots; None for others."""
    m = MOE_KEY.fullmatch(key)
    if m is None or router_spec(cfg.router).dense:
        return None
    layer = int(m[1])
    stacked = any(p.key == key and p.group is not None
                  for p in layer_pieces(cfg, layer, [key]))
    return layer if stacked else None
