"""Expert-load figures from per-layer assignment counts."""

from __future__ import annotations

import torch


def load_figures(counts_E: torch.Tensor, num_groups: int) -> dict:
    """Shares per expert and per group, CV and MaxVio of expert load, dead experts.
    CV is the population std / mean, the usual 'expert balance' figure."""
    c = counts_E.double()
    total = c.sum().clamp_min(1)
    mean = c.mean().clamp_min(1e-12)
    groups = c.view(num_groups, -1).sum(1)
    return {
        "expert_share": (c / total).tolist(),
        "group_share": (groups / total).tolist(),
        "expert_cv": float(c.std(unbiased=False) / mean),
        "expert_maxvio": float((c.max() - mean) / mean),
        "group_cv": float(groups.std(unbiased=False) / groups.mean().clamp_min(1e-12)),
        "dead_experts": int((c == 0).sum()),
    }
