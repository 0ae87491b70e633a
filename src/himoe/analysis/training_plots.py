"""The PNGs written at the end of training: loss curves and the last evaluation's expert load.

Both need matplotlib (a dependency); where it cannot be imported, training skips them with a
one-line note.
"""

from __future__ import annotations

import json
from pathlib import Path

from himoe.analysis.heatmaps import pyplot
from himoe.checkpoint import safe_path

LOSS_PNG = "loss_curves.png"
LOAD_PNG = "expert_load.png"


def _save(fig, path: Path) -> None:
    """Written under a temporary name and renamed: never half a PNG, never through a link."""
    safe_path.write_atomic(path, lambda f: fig.savefig(f, dpi=100, format="png"))


def loss_curves(plt, metrics_lines: list[str], path: Path) -> Path:
    """Training loss (mean over each evaluation window) and validation loss against step."""
    evals = [json.loads(line) for line in metrics_lines]
    steps = [e["step"] for e in evals]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [e["train_loss"] for e in evals], marker="o", label="train")
    ax.plot(steps, [e["val_loss"] for e in evals], marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("loss curves")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def expert_load(plt, layers: list[dict], num_experts: int, path: Path) -> Path:
    """One heatmap per layer: rows are groups, columns experts, cells the share of the
    validation assignments (the last evaluation's)."""
    fig, axes = plt.subplots(len(layers), 1, squeeze=False,
                             figsize=(max(4.0, 0.5 * num_experts + 2.5),
                                      1.0 + len(layers) * (0.35 * len(layers[0]["group_share"])
                                                           + 1.0)))
    for i, (ax, layer) in enumerate(zip(axes[:, 0], layers)):
        sizes = layer.get("group_sizes", [num_experts] * len(layer["group_share"]))
        # Empty slots of smaller groups (after `experts add`) are blank, not a zero share.
        share_GM = [[layer["expert_share"][g * num_experts + j] if j < n else float("nan")
                     for j in range(num_experts)] for g, n in enumerate(sizes)]
        image = ax.imshow(share_GM, aspect="auto", cmap="viridis", vmin=0)
        ax.set_yticks(range(len(share_GM)), [f"group {g + 1}" for g in range(len(share_GM))])
        ax.set_xticks(range(num_experts), [str(j + 1) for j in range(num_experts)])
        ax.set_title(f"layer {i + 1}: share of assignments (CV {layer['expert_cv']:.2f}, "
                     f"dead {layer['dead_experts']})", fontsize=9)
        fig.colorbar(image, ax=ax)
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def training_plots(metrics_lines: list[str], last_eval: dict, num_experts: int,
                   model_dir: Path) -> tuple[list[Path], str | None]:
    """(PNGs written, a note when they could not be)."""
    plt = pyplot()
    if plt is None:
        return [], "matplotlib is not installed, so no PNG plots were written (pip install " \
                   "matplotlib)"
    written = [loss_curves(plt, metrics_lines, Path(model_dir) / LOSS_PNG)]
    if last_eval["layers"]:
        written.append(expert_load(plt, last_eval["layers"], num_experts,
                                   Path(model_dir) / LOAD_PNG))
    return written, None
