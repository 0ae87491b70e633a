"""The card's terminal utilisation chart: share of tokens per group and per expert."""

from __future__ import annotations

BAR_WIDTH = 30
EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(share: float, scale: float) -> str:
    """A horizontal bar of share / scale * BAR_WIDTH cells, drawn in eighths of a cell."""
    cells = 0.0 if scale <= 0 else share / scale * BAR_WIDTH
    whole, part = int(cells), int((cells - int(cells)) * 8)
    return ("█" * whole + (EIGHTHS[part] if part else "")).ljust(BAR_WIDTH)


def utilisation_chart(layers: list[dict], num_experts: int) -> str:
    """layers: one load_figures() dict per MoE layer. Group bars are scaled to the largest
    group; each expert bar is its share of the layer's tokens, scaled to the largest expert."""
    lines = ["Expert utilisation (share of validation tokens)"]
    for layer, fig in enumerate(layers, start=1):
        groups, experts = fig["group_share"], fig["expert_share"]
        lines.append(f"layer {layer}  (expert-load CV {fig['expert_cv']:.2f}, "
                     f"dead experts {fig['dead_experts']})")
        top_group, top_expert = max(groups), max(experts)
        for g, gshare in enumerate(groups):
            lines.append(f"  moe_expert_{g + 1:03d} {bar(gshare, top_group)} {gshare:6.1%}")
            for j in range(fig.get("group_sizes", [num_experts] * len(groups))[g]):
                share = experts[g * num_experts + j]
                lines.append(f"      model_{j + 1:03d} {bar(share, top_expert)} {share:6.1%}")
    return "\n".join(lines)
