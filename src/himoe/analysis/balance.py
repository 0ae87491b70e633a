"""Expert-load figures from per-layer assignment counts (ROUTING.md section 5)."""

from __future__ import annotations

import math

import torch


def max_violation(counts_E: torch.Tensor) -> float:
    """MaxVio = (max load - mean load) / mean load: 0 at perfect balance."""
    c = counts_E.double()
    mean = c.mean().clamp_min(1e-12)
    return float((c.max() - mean) / mean)


def load_figures(counts_E: torch.Tensor, num_groups: int) -> dict:
    """Shares per expert and per group; CV (population std / mean, the usual 'expert
    balance' figure), MaxVio and normalised entropy of the expert load; dead experts;
    the same for groups."""
    c = counts_E.double()
    total = c.sum().clamp_min(1)
    mean = c.mean().clamp_min(1e-12)
    share = c / total
    groups = c.view(num_groups, -1).sum(1)
    entropy = -(share * share.clamp_min(1e-300).log()).sum()
    return {
        "expert_share": share.tolist(),
        "group_share": (groups / total).tolist(),
        "expert_cv": float(c.std(unbiased=False) / mean),
        "expert_maxvio": max_violation(counts_E),
        "load_entropy": float(entropy / math.log(len(c))) if len(c) > 1 else 1.0,
        "dead_experts": int((c == 0).sum()),
        "group_cv": float(groups.std(unbiased=False) / groups.mean().clamp_min(1e-12)),
        "largest_group_share": float(groups.max() / total),
    }
