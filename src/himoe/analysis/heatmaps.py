"""PNG heatmaps of routing by domain (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

from himoe.checkpoint import safe_path
from himoe.errors import UserError


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), or None when matplotlib is
    not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def domain_expert_heatmaps(layers: list[dict], num_experts: int, out_dir: Path) -> list[Path]:
    """One PNG per layer: rows are domains, columns experts (labelled group.expert), each cell
    the share of the domain's assignments that went to the expert. Lines mark the groups."""
    plt = pyplot()
    if plt is None:
        raise UserError("the heatmaps need matplotlib, which himoe installs; reinstall it "
                        "with `pip install matplotlib`, or pass --no_plots")

    paths = []
    for fig_layer in layers:
        names = list(fig_layer["expert_share"])
        sizes = fig_layer["balance"]["group_sizes"]
        slots = [g * num_experts + j for g, n in enumerate(sizes) for j in range(n)]
        share_DE = [[fig_layer["expert_share"][n][e] for e in slots] for n in names]
        E = len(slots)
        size = (max(5.0, 0.28 * E + 2.5), max(2.5, 0.45 * len(names) + 1.5))
        fig, ax = plt.subplots(figsize=size)
        image = ax.imshow(share_DE, aspect="auto", cmap="viridis", vmin=0)
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(E), [f"{e // num_experts + 1}.{e % num_experts + 1}"
                                 for e in slots], rotation=90, fontsize=7)
        for edge in itertools.accumulate(sizes[:-1]):
            ax.axvline(edge - 0.5, color="white", linewidth=1)
        nmi = fig_layer["nmi_expert"]
        ax.set_title(f"layer {fig_layer['layer']}: share of each domain's tokens per expert "
                     f"(NMI {'n/a' if nmi is None else f'{nmi:.3f}'})", fontsize=9)
        ax.set_xlabel("expert (group.expert)")
        fig.colorbar(image, ax=ax, label="share of the domain")
        fig.tight_layout()
        path = Path(out_dir) / f"layer_{fig_layer['layer']:02d}_domain_expert.png"
        safe_path.write_atomic(path, functools.partial(fig.savefig, dpi=100, format="png"))
        plt.close(fig)
        paths.append(path)
    return paths
