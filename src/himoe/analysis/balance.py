"""Expert-load figures from per-layer assignment counts (ROUTING.md section 5)."""

from __future__ import annotations

import math

import torch


def max_violation(counts_E: torch.Tensor) -> float:
    """MaxVio = (max load - mean load) / mean load: 0 at perfect balance."""
    c = counts_E.double()
    mean = c.mean().clamp_min(1e-12)
    return float((c.max() - mean) / mean)


def load_figures(counts_E: torch.Tensor, num_groups: int,
                 group_sizes: list[int] | None = None) -> dict:
    """Shares per expert and per group; CV (population std / mean, the usual 'expert
    balance' figure), MaxVio and normalised entropy of the expert load; dead experts;
    the same for groups. counts_E has num_groups equal runs of slots; group_sizes: how many
    slots of each run hold an expert (ragged groups), the statistics count only those."""
    c_all = counts_E.double()
    M = len(c_all) // num_groups
    sizes = group_sizes or [M] * num_groups
    c = c_all[[g * M + j for g, n in enumerate(sizes) for j in range(n)]]
    total = c.sum().clamp_min(1)
    mean = c.mean().clamp_min(1e-12)
    share = c / total
    groups = c_all.view(num_groups, -1).sum(1)
    entropy = -(share * share.clamp_min(1e-300).log()).sum()
    return {
        "expert_share": (c_all / total).tolist(),  # by slot g * M + j
        "group_share": (groups / total).tolist(),
        "group_sizes": list(sizes),
        "expert_cv": float(c.std(unbiased=False) / mean),
        "expert_maxvio": max_violation(c),
        "load_entropy": float(entropy / math.log(len(c))) if len(c) > 1 else 1.0,
        "dead_experts": int((c == 0).sum()),
        "group_cv": float(groups.std(unbiased=False) / groups.mean().clamp_min(1e-12)),
        "largest_group_share": float(groups.max() / total),
    }


# A layer counts as collapsed past either limit. A CV of 1 means the load's spread equals
# its mean: far from the < 0.3 that balanced routing reaches, far below a full collapse
# (sqrt(E - 1), 6.9 for 48 experts), so a layer on its way there is caught early.
COLLAPSE_CV = 1.0
COLLAPSE_DEAD_FRACTION = 0.5


def collapse_warning(layer: int, figures: dict, hint: str) -> str | None:
    """One line naming a collapsed layer (1-based), its busiest expert and the flag that
    helps (hint), or None when the layer's load is fine. figures: load_figures()'s dict."""
    real = sum(figures["group_sizes"])
    cv, dead = figures["expert_cv"], figures["dead_experts"]
    if cv <= COLLAPSE_CV and dead <= COLLAPSE_DEAD_FRACTION * real:
        return None
    shares = figures["expert_share"]
    busiest = max(range(len(shares)), key=shares.__getitem__)
    M = len(shares) // len(figures["group_share"])
    return (f"warning: layer {layer} routing has collapsed (expert-load CV {cv:.2f}, "
            f"{dead} of {real} experts dead; moe_expert_{busiest // M + 1:03d}/"
            f"model_{busiest % M + 1:03d} takes {shares[busiest]:.0%} of tokens); {hint}")
