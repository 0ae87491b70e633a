"""`himoe experts prune`: remove experts from a saved hierarchical model, with their rows of
the group routers.

The groups then have different sizes, recorded as `experts add` records them (config.json's
group_experts, num_experts the largest group). Inside a group the kept experts keep their
order and are numbered 1..n again: an expert whose number changes moves to its new file name
with its bytes unchanged, and config.json's expert_index_map records, per layer and group,
the number each expert had before the first prune now has (0: pruned). Every other file
stays byte for byte, but for the changed groups' router files (the pruned rows gone, their
balancing biases too) and train_state.pt, whose optimiser moments of the pruned experts are
dropped and the others' moved with their experts, so --resume goes on where training
stopped. One atomic save (himoe.edit.surgery.rewrite).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from himoe.checkpoint import card as checkpoint
from himoe.checkpoint import card_layout
from himoe.config import HiMoEConfig
from himoe.edit.slots import group_router, resized_config, resized_writers
from himoe.edit.specs import describe_file, spec_files
from himoe.edit.surgery import current_manifest, rewrite, torch_writer
from himoe.errors import UserError
from himoe.model.routers.registry import router_spec

Expert = tuple[int, int, int]  # (layer, group, expert), 0-based


def check_prunable(cfg: HiMoEConfig, model_dir: Path) -> None:
    spec = router_spec(cfg.router)
    if spec.dense:
        raise UserError(f"{model_dir} is a dense model: it has no experts to prune")
    if not spec.group_routers:
        raise UserError(f"{model_dir} uses the {cfg.router!r} router, whose groups cannot "
                        "differ in size; `experts prune` works on hierarchical models (the "
                        "card's)")


def expert_shares(layers: list[dict], cfg: HiMoEConfig) -> dict[Expert, float]:
    """Each expert's share of the routed validation assignments, from evaluate()'s
    per-layer figures: the share `himoe experts list` prints."""
    M = cfg.num_experts
    return {(L, g, j): layers[L]["expert_share"][g * M + j] for L in range(cfg.n_layer)
            for g, n in enumerate(cfg.group_sizes(L)) for j in range(n)}


def below_share(shares: dict[Expert, float], min_share: float,
                keep_at_least: int = 1) -> tuple[set[Expert], list[tuple[int, int]]]:
    """(the experts below min_share, the groups they would have emptied). A collapsed model
    has whole groups without tokens, and a group cannot be empty: such a group keeps the
    `keep_at_least` of its experts with the highest share (ties: the lower number)."""
    chosen, spared = set(), []
    for group, ranked in ranked_groups(shares).items():
        below = [e for e in ranked if shares[e] < min_share]
        short = keep_at_least - (len(ranked) - len(below))
        if short > 0 and below:
            below, spared = below[short:], spared + [group]
        chosen.update(below)
    return chosen, sorted(spared)


def beyond_best(shares: dict[Expert, float], keep: int) -> set[Expert]:
    """Every expert but the `keep` of highest share in each group (ties: the lower number
    stays)."""
    return {e for ranked in ranked_groups(shares).values() for e in ranked[keep:]}


def ranked_groups(shares: dict[Expert, float]) -> dict[tuple[int, int], list[Expert]]:
    """{(layer, group): its experts, highest share first (ties: the lower number first)}."""
    groups: dict[tuple[int, int], list[Expert]] = {}
    for e in sorted(shares, key=lambda e: (-shares[e], e)):
        groups.setdefault(e[:2], []).append(e)
    return groups


def named(text: str, cfg: HiMoEConfig) -> set[Expert]:
    """The experts a SPEC names (its routers and the backbone are never pruned)."""
    chosen = set()
    for rel in spec_files(text, cfg, "--only"):
        layer, group, expert = describe_file(rel, cfg)
        if group is not None and expert is not None:
            chosen.add((layer - 1, group - 1, expert - 1))
    if not chosen:
        raise UserError(f"--only {text!r} names no routed experts (routers, shared experts and "
                        "the backbone are not pruned); name experts, e.g. "
                        "layer1.group2.expert3 or layer1.group2")
    return chosen


def kept_experts(cfg: HiMoEConfig, chosen: set[Expert]) -> list[list[list[int]]]:
    """Per layer and group, the experts (0-based, in order) that stay when `chosen` go.
    Refused when a group would keep fewer than top_k_experts (at least one)."""
    kept = []
    for L in range(cfg.n_layer):
        row = []
        for g, n in enumerate(cfg.group_sizes(L)):
            keep = [j for j in range(n) if (L, g, j) not in chosen]
            if len(keep) < max(1, cfg.top_k_experts):
                what = ("no experts" if not keep else f"{len(keep)} expert(s), fewer than the "
                        f"{cfg.top_k_experts} that --top_k_experts picks")
                raise UserError(f"pruning would leave group {g + 1} of layer {L + 1} with "
                                f"{what}; prune fewer there (e.g. --keep_per_group "
                                f"{max(1, cfg.top_k_experts)})")
            row.append(keep)
        kept.append(row)
    return kept


def pruned_config(cfg: HiMoEConfig, kept: list[list[list[int]]]) -> HiMoEConfig:
    """cfg with only the kept experts; expert_index_map follows each original expert."""
    before = cfg.expert_index_map or [[list(range(1, n + 1)) for n in cfg.group_sizes(L)]
                                      for L in range(cfg.n_layer)]
    new_index = [[{old: new + 1 for new, old in enumerate(keep)} for keep in row]
                 for row in kept]
    index_map = [[[new_index[L][g].get(n - 1, 0) if n else 0 for n in original]
                  for g, original in enumerate(row)] for L, row in enumerate(before)]
    sizes = [[len(keep) for keep in row] for row in kept]
    return resized_config(dataclasses.replace(cfg, expert_index_map=index_map), sizes)


def renamed_files(cfg: HiMoEConfig, kept: list[list[list[int]]]) -> list[tuple[str, str]]:
    """(old, new) name of every kept expert whose number changes."""
    return [(card_layout.expert_file(cfg, L, g, old), card_layout.expert_file(cfg, L, g, new))
            for L, row in enumerate(kept) for g, keep in enumerate(row)
            for new, old in enumerate(keep) if new != old]


def prune(model_dir: Path, cfg: HiMoEConfig, vocab: list[str], step: int,
          kept: list[list[list[int]]]) -> None:
    """Keep only the `kept` experts of model_dir, in one atomic save."""
    model_dir = Path(model_dir)
    current_manifest(model_dir)  # refuse a damaged directory before any work
    new_cfg = pruned_config(cfg, kept)
    writers, drop = {}, set()
    for L, row in enumerate(kept):
        for g, keep in enumerate(row):
            n = cfg.group_sizes(L)[g]
            if len(keep) == n:
                continue
            router = group_router(model_dir, cfg, L, g)
            rows = torch.tensor(keep)
            writers[card_layout.group_router_file(cfg, L, g)] = torch_writer(
                {entry: t.index_select(0, rows) for entry, t in router.items()})
            drop |= {card_layout.expert_file(cfg, L, g, j) for j in range(n)}
            for new, old in enumerate(keep):  # bytes as they are: an int8 expert stays int8
                writers[card_layout.expert_file(cfg, L, g, new)] = checkpoint.copy_writer(
                    model_dir, card_layout.expert_file(cfg, L, g, old))
    writers |= resized_writers(model_dir, cfg, new_cfg, vocab, step,
                               lambda layer, group: kept[layer][group])
    rewrite(model_dir, writers, drop)
