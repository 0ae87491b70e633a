"""One optimisation step, shared by `himoe train` and `himoe bench`."""

from __future__ import annotations

import torch

from himoe.distributed.plan import Parallel
from himoe.model import HiMoEModel
from himoe.model.grad_sink import zero_grads


class NonFiniteStep(Exception):
    """train_step found a non-finite loss or gradient norm and applied no update."""

    def __init__(self, loss: float, grad_norm: float):
        super().__init__(f"loss {loss}, gradient norm {grad_norm}")
        self.loss, self.grad_norm = loss, grad_norm


def write_expert_grads_in_place(model: HiMoEModel) -> None:
    """Idle experts cost no gradient writes or norm reads (himoe.model.grad_sink); only for
    one process, where no DDP, FSDP or --train_only hook needs to see those gradients."""
    for moe in model.moe_layers.values():
        moe.experts.write_grads_in_place()


def train_step(model: HiMoEModel, optimizer, params, x_BT, y_BT, *, grad_clip: float,
               forward=None, parallel: Parallel | None = None,
               bias_rate_scale: float = 1.0) -> torch.Tensor:
    """One optimisation step: forward, backward, clip, AdamW, zero_grad, then the loss-free
    balancing update. `himoe bench` times exactly this function, so its figures are those
    of `himoe train`. forward: a compiled (or DDP) version of model, if any. parallel: how
    the step is split into micro-batches and ranks (default: one process, one batch).
    grad_clip: the training setting (the model holds only its own). bias_rate_scale: this
    step's factor on the loss-free bias step (bias_rate_at)."""
    parallel = parallel or Parallel()
    loss = parallel.forward_backward(forward or model, x_BT, y_BT)
    norm = parallel.clip_grad_norm(params, grad_clip, optimizer)
    try:
        # A non-finite loss or gradient norm must never reach the weights or AdamW's
        # moments. One host sync; the caller reads the loss every step anyway.
        if not bool(torch.isfinite(torch.stack([loss.detach().float(), norm.float()])).all()):
            zero_grads(model, optimizer)
            raise NonFiniteStep(loss.item(), float(norm))
        optimizer.step()
    finally:
        optimizer.grad_scale = None  # a clip left to this step (scale_gradients): once
    zero_grads(model, optimizer)
    if model.cfg.bias_update_rate:
        parallel.sync_balance_counts(model)
        model.update_balance_biases(bias_rate_scale)
    return loss
