"""`--preset`: himoe's default and the routing and losses of each source design, at our
model size.

Every MoE preset keeps the card's active parameters per token: its routed experts are
narrowed so that (experts per token) x (expert width) + (shared expert width) =
4 * n_embd, the card's one expert. Explicit flags still override anything a preset sets.
"""

from __future__ import annotations

from himoe.errors import UserError

# The source designs have no shared expert; each states its own balancing loss. They keep
# the card's dropout 0.1, which himoe's default drops (docs/routing_study.md, "Dropout").
_SOURCE = dict(shared_fraction=0.0, switch_coef=0.0, bias_update_rate=0.0,
               bias_rate_schedule="constant", dropout=0.1)

PRESETS: dict[str, dict] = {
    # himoe's default: one group, then two of its experts, beside a shared expert of half
    # the active width (a quarter until 2026-12-08, docs/efficiency.md); two-level Switch
    # loss 0.01, loss-free bias 1e-3 whose step follows the learning-rate schedule, and no
    # dropout (docs/routing_study.md); what no --preset gives.
    "himoe": dict(router="hierarchical", top_k_groups=1, top_k_experts=2, shared_fraction=0.5,
                  switch_coef=0.01, bias_update_rate=1e-3, bias_rate_schedule="lr",
                  dropout=0.0),
    # The HiMoE card: hierarchical hard top-1 at both levels, no balancing loss, and the
    # card's learning rate.
    "himoe-card": _SOURCE | dict(router="hierarchical", top_k_groups=1, top_k_experts=1,
                                 lr=3e-4),
    # The card's routing with loss-free bias balancing (the gradient is left alone).
    "himoe-balanced": _SOURCE | dict(router="hierarchical", top_k_groups=1, top_k_experts=1,
                                     bias_update_rate=1e-3),
    # The Hi-MoE paper's reference code: grouped top-1 in every group, its loss terms,
    # R_intra ramped in after the balance terms (the paper's two stages).
    "hi-moe": _SOURCE | dict(router="grouped", top_k_experts=1, switch_coef=0.01, z_coef=0.001,
                             inter_coef=0.05, intra_coef=0.1, intra_warmup=100),
    # MiniMoE: 4 experts, top-2, renormalised, Switch loss.
    "minimoe": _SOURCE | dict(router="topk", num_moes=1, num_experts=4, top_k_experts=2,
                              renormalize=True, switch_coef=0.01),
    # OLMoE: 64 experts, top-8, raw probabilities, Switch 0.01 + z 0.001, dropless.
    "olmoe": _SOURCE | dict(router="topk", num_moes=1, num_experts=64, top_k_experts=8,
                            renormalize=False, switch_coef=0.01, z_coef=0.001),
    # The dense-equivalent baseline.
    "dense": dict(router="dense"),
}


def preset_values(name: str, given: dict) -> dict:
    """The preset's settings, then the user's explicit flags on top. The expert width follows
    from them (HiMoEConfig.ffn_hidden) unless --expert_hidden was given."""
    if name not in PRESETS:
        raise UserError(f"--preset {name!r} is not one of {', '.join(PRESETS)}")
    return {**PRESETS[name], **given, "preset": name}
