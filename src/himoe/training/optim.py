"""AdamW parameter groups and the card's learning-rate schedule."""

from __future__ import annotations

import math

import torch

from himoe.config import TrainConfig
from himoe.errors import UserError
from himoe.model.grad_sink import grad_parts

# Parts of the model that may learn at their own multiple of the schedule's rate: the tag
# on their AdamW parameter groups, the setting that scales them, and how their names show.
SCALED_PARTS = (("routers", "router_lr_scale", ".router."),
                ("experts", "expert_lr_scale", ".experts."))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices (embeddings, attention, routers, stacked experts); none on
    biases and LayerNorms. The tied embedding is one parameter and is listed once. A part
    whose lr scale is not 1 (the routers, the routed experts) gets its own two groups,
    tagged with its name (set_scheduled_lr scales their rate); the routers' groups come
    first, so an optimiser state saved before the experts' option existed still loads."""
    buckets: dict[tuple[str | None, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():  # already skips the tied copy
        buckets.setdefault((scaled_part(name, cfg), p.dim() >= 2), []).append(p)
    groups = []
    for tag in (None, *(tag for tag, _, _ in SCALED_PARTS)):
        for decays in (True, False):
            params = buckets.get((tag, decays), [])
            if tag is None or params:
                group = {"params": params, "weight_decay": cfg.weight_decay if decays else 0.0}
                groups.append(group | ({tag: True} if tag else {}))
    try:
        # The fused kernel makes one pass over each tensor: on a CPU it is ~5x faster than
        # the default loop, which matters when 50M expert weights are updated every step.
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def scaled_part(name: str, cfg: TrainConfig) -> str | None:
    """The tag of the scaled part a parameter belongs to, or None for the main groups."""
    for tag, setting, marker in SCALED_PARTS:
        if getattr(cfg, setting) != 1 and marker in f".{name}":
            return tag
    return None


def check_lr_scales(cfg: TrainConfig, saved: TrainConfig) -> None:
    """A resumed run keeps the optimiser grouping it was saved with: a part at lr scale 1
    stays in AdamW's main parameter groups, at any other value in its own, and the saved
    state only loads into the grouping it came from."""
    for _, setting, _ in SCALED_PARTS:
        scale, saved_scale = getattr(cfg, setting), getattr(saved, setting)
        if (scale == 1) != (saved_scale == 1):
            fix = "a value other than 1" if saved_scale != 1 else "1"
            raise UserError(f"--{setting} {scale:g} cannot resume a run trained at "
                            f"{saved_scale:g}: the saved optimiser state is grouped for "
                            f"{fix}; pass {fix}, or drop the flag")


def set_scheduled_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Every parameter group at the schedule's rate for `step`, a scaled part's groups
    times its scale; returns the schedule's rate."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
        for tag, setting, _ in SCALED_PARTS:
            if group.get(tag):
                group["lr"] = lr * getattr(cfg, setting)
    return lr


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_iters, then cosine decay to min_lr_ratio * lr at max_iters."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    span = max(1, cfg.max_iters - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def bias_rate_at(step: int, cfg: TrainConfig) -> float:
    """The factor on the loss-free bias step at `step`: 1, or with --bias_rate_schedule lr
    the learning rate's own factor (lr_at / lr), so the bias warms up and decays with it."""
    return lr_at(step, cfg) / cfg.lr if cfg.bias_rate_schedule == "lr" else 1.0


def clip_grad_norm(params: list[torch.Tensor], max_norm: float,
                   optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
    """Clips as clip_grad_norm_ does, minus two passes over the gradients on a CPU: under
    the limit it skips the multiply by exactly 1.0, and over it, with a fused optimizer, it
    leaves the division to the optimizer's own pass (see scale_gradients). At 50M expert
    weights each pass costs ~2% of a CPU step. On GPUs the check would be a host sync, so
    there the library call is used. The norm is grad_norm's, over the slices that may be
    nonzero (an expert bank with a grad sink lists only its experts that got tokens)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or grads[0].is_cuda:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = grad_norm([part for p in params for part in grad_parts(p)])
    if norm > max_norm:
        scale_gradients(grads, norm, max_norm, optimizer)
    return norm


def scale_gradients(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float,
                    optimizer: torch.optim.Optimizer | None) -> None:
    """Scale grads by max_norm / (norm + 1e-6), as clip_grad_norm_ does. A fused Adam
    kernel divides every gradient by `optimizer.grad_scale` as it reads it (the hook
    torch.amp.GradScaler uses to unscale), so there the clip costs no pass of its own;
    train_step clears it after the step, taken or not, so it applies once."""
    if optimizer is not None and optimizer.defaults.get("fused"):
        optimizer.grad_scale = ((norm + 1e-6) / max_norm).float()
    else:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all grads together, in fp32. Reduced row by row, then over the row
    norms: on a CPU that is ~25% faster than one vector_norm over a whole 12M-element
    expert bank, and far more accurate (relative error ~1e-7 against float64, where the
    one-shot reduction, as in clip_grad_norm_, drifts by ~5e-4)."""
    if not grads:
        return torch.zeros(())
    rows = [torch.linalg.vector_norm(g.reshape(-1, g.shape[-1]) if g.dim() else g.reshape(1, 1),
                                     dim=1) for g in grads]
    return torch.linalg.vector_norm(torch.cat(rows))
