"""--log tensorboard: the training run's scalars as TensorBoard event files.

Every step: train/loss, train/lr. Every evaluation: val/loss, val/perplexity,
train/window_loss, speed/tokens_per_s and per layer the balance figures
(layer_LL/expert_cv, expert_maxvio, dead_experts, load_entropy, group_cv, drop_rate).
"""

from __future__ import annotations

from pathlib import Path

from himoe.errors import UserError

BALANCE_KEYS = ("expert_cv", "expert_maxvio", "batch_maxvio", "dead_experts", "load_entropy",
                "group_cv", "largest_group_share", "routing_entropy", "drop_rate")


def require_tensorboard():
    """torch's SummaryWriter class, or a one-line error when the tensorboard package is
    missing (torch imports it lazily)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--log tensorboard needs the tensorboard package: pip install "
                        "'himoe[tensorboard]' (or drop --log)") from None
    return SummaryWriter


class TensorBoardLog:
    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.writer = require_tensorboard()(log_dir=str(self.log_dir))

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def evaluation(self, ev: dict) -> None:
        step, add = ev["step"], self.writer.add_scalar
        add("val/loss", ev["val_loss"], step)
        add("val/perplexity", ev["val_ppl"], step)
        add("train/window_loss", ev["train_loss"], step)
        add("speed/tokens_per_s", ev["tokens_per_s"], step)
        for i, layer in enumerate(ev["layers"]):
            for key in BALANCE_KEYS:
                if key in layer:
                    add(f"layer_{i + 1:02d}/{key}", layer[key], step)
        self.writer.flush()  # an evaluation is a save point: the curve so far is on disk

    def close(self) -> None:
        self.writer.close()
