"""Parallel: what the trainer asks of the run it is part of. One object for every mode:

    single            one process (gradient accumulation only)
    ddp               DistributedDataParallel: everything replicated, gradients all-reduced
    fsdp              FSDP2 fully_shard: parameters, gradients and AdamW state sharded
    expert_parallel   experts spread over ranks, the rest replicated (expert_parallel.py)

Data: every rank draws the same global batch (one shared generator, so the data position is
one number for all ranks) and takes its slice. --grad_accum A cuts the global batch into A
micro-batches first and each rank takes its slice of each, so micro-batch i covers the same
rows of the batch whatever the number of ranks. With equal slices the mean of the ranks'
mean losses is the mean over the global batch: losses and gradients equal one process
running the same batch, up to float rounding. Terms computed from batch statistics (the
auxiliary balance losses, capacity limits) see each rank's micro-batch.

Router state that changes in training stays identical on every rank: loss-free balancing
counts are summed over ranks before the bias update, and the grouped router's logit EMA is
fed the mean over ranks of the batch-mean logits (the grouped router in
himoe.model.routers.flat calls mean_over_ranks).
"""

from __future__ import annotations

import contextlib
import inspect
import io
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from himoe.config import HiMoEConfig
from himoe.distributed import expert_parallel, sharded
from himoe.distributed.collectives import gather_rows, mean_over_ranks, sum_over_ranks_
from himoe.errors import UserError
from himoe.model import HiMoEModel
from himoe.model.routers.registry import router_spec
from himoe.training.optim import clip_grad_norm, grad_norm, scale_gradients


class Discard(io.StringIO):
    """The stdout of ranks other than 0: they train in step but say nothing."""

    def write(self, s: str) -> int:
        return len(s)


@dataclass
class Parallel:
    mode: str = "single"
    grad_accum: int = 1
    rank: int = 0
    world: int = 1
    _model: nn.Module | None = field(default=None, repr=False)
    _ddp: nn.Module | None = field(default=None, repr=False)
    _experts: list = field(default_factory=list, repr=False)  # expert_parallel: local experts
    _replicated: list = field(default_factory=list, repr=False)  # expert_parallel: the rest

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check(self, cfg: HiMoEConfig, train_only: str | None) -> None:
        """Refuse settings this mode cannot run, before any work."""
        if self.grad_accum < 1:
            raise UserError(f"--grad_accum must be >= 1, got {self.grad_accum}")
        parts = self.grad_accum * self.world
        if cfg.batch_size % parts:
            raise UserError(f"--batch_size {cfg.batch_size} does not split into --grad_accum "
                            f"{self.grad_accum} x {self.world} processes; use a multiple of "
                            f"{parts}")
        if train_only is not None and self.world > 1:
            raise UserError("--train_only runs in one process; launch it without torchrun")
        if self.mode == "expert_parallel":
            if router_spec(cfg.router).dense:
                raise UserError("--expert_parallel needs MoE layers; the dense router has "
                                "none, use plain torchrun (data-parallel) instead")
            if cfg.total_experts % self.world:
                raise UserError(f"--expert_parallel {self.world}: {cfg.total_experts} experts "
                                f"per layer do not split evenly over {self.world} ranks; use "
                                "a rank count that divides num_moes * num_experts")

    # --- placing the model ---
    def place(self, model: HiMoEModel, device: torch.device) -> None:
        """Cut or shard the model for this rank and move it to the device, in place."""
        self._model = model
        if self.mode == "expert_parallel":
            # Cut before moving: the device only ever holds this rank's experts.
            expert_parallel.shard_experts(model, self.rank, self.world)
            self._experts = expert_parallel.expert_parameters(model)
            ids = {id(p) for p in self._experts}
            self._replicated = [p for p in model.parameters() if id(p) not in ids]
        model.to(device)
        if self.mode == "fsdp":
            sharded.shard(model, device, self.world)

    def wrap(self, model: HiMoEModel, device: torch.device) -> nn.Module:
        """The module the training forward calls (DDP wraps; the other modes run as is)."""
        if self.mode != "ddp":
            return model
        from torch.nn.parallel import DistributedDataParallel

        # No buffer sync at each forward: router buffers are kept equal explicitly (see
        # above), rank 0's copy must not overwrite the others. Torch 2.13 renamed the
        # switch (the old name warns); the one sync at start-up it keeps is harmless,
        # the ranks' buffers start equal.
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
        self._ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
        return self._ddp

    # --- one optimisation step ---
    def micro_batches(self, x_BT: torch.Tensor, y_BT: torch.Tensor) -> list[tuple]:
        """This rank's slice of each of the grad_accum micro-batches of the global batch."""
        micro = x_BT.shape[0] // self.grad_accum
        rows = micro // self.world
        starts = (i * micro + self.rank * rows for i in range(self.grad_accum))
        return [(x_BT[s:s + rows], y_BT[s:s + rows]) for s in starts]

    def forward_backward(self, forward, x_BT: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches; gradients end up as those
        of the global batch's mean loss on every rank. Returns that loss (detached)."""
        micro = self.micro_batches(x_BT, y_BT)
        # DDP and FSDP average over ranks themselves; the expert-parallel gradients are sums.
        scale = 1.0 / (len(micro) * (self.world if self.mode == "expert_parallel" else 1))
        losses = []
        for i, (x, y) in enumerate(micro):
            with self._grad_sync(last=i == len(micro) - 1):
                _, loss = forward(x, y)
                (loss if scale == 1.0 else loss * scale).backward()
            losses.append(loss.detach())
        if self.mode == "expert_parallel":
            self._reduce_replicated_grads()
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        return mean_over_ranks(loss)

    def _grad_sync(self, last: bool):
        """Gradients are exchanged once per step, after the last micro-batch."""
        if self._ddp is not None and not last:
            return self._ddp.no_sync()
        if self.mode == "fsdp":
            self._model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _reduce_replicated_grads(self) -> None:
        """expert_parallel: sum the replicated parameters' gradients over ranks in one
        flat all-reduce. An expert that got no token has a zero gradient, never None."""
        for p in self._experts + self._replicated:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self._replicated]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in
                                     zip(flat.split([g.numel() for g in grads]), grads)])

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float,
                       optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        """The global gradient norm, clipped as clip_grad_norm_ does, equal on every rank;
        with a fused optimizer the scaling may be left to its next step (scale_gradients)."""
        if self.mode == "fsdp":  # DTensor gradients: the library call reduces over shards
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if self.mode != "expert_parallel":  # gradients are already equal on every rank
            return clip_grad_norm(params, max_norm, optimizer)
        # Replicated gradients count once; each expert lives on one rank: sum their squares.
        rep_sq = grad_norm([p.grad for p in self._replicated]).square()
        expert_sq = grad_norm([p.grad for p in self._experts]).square()
        norm = (rep_sq + sum_over_ranks_(expert_sq)).sqrt()
        if norm > max_norm:
            scale_gradients([p.grad for p in params], norm, max_norm, optimizer)
        return norm

    def sync_balance_counts(self, model: HiMoEModel) -> None:
        """Loss-free balancing: each router's per-step assignment counts (its non-persistent
        *counts* buffers) summed over ranks, so every rank makes the same bias update."""
        if self.world == 1:
            return
        for moe in model.moe_layers.values():
            for name, buf in moe.router.named_buffers():
                if "counts" in name:
                    dist.all_reduce(buf)

    # --- saving and resuming ---
    def full_model(self, model: HiMoEModel) -> HiMoEModel | None:
        """The whole model in the single-process layout on rank 0 (for checkpoint.save_model),
        None elsewhere. Collective: every rank calls it."""
        if self.mode in ("single", "ddp"):
            return model if self.is_main else None
        if self.mode == "fsdp":
            state = sharded.full_model_state(model)
        else:
            state = expert_parallel.full_model_state(model)
        if not self.is_main:
            return None
        with torch.device("meta"):  # no memory: the gathered tensors are assigned in
            full = HiMoEModel(model.cfg)
        state.setdefault("lm_head.weight", state["tok_emb.weight"])
        full.load_state_dict(state, assign=True)
        return full

    def optimizer_state(self, model: HiMoEModel, optimizer) -> dict | None:
        """AdamW's state in the single-process layout (parameter indices in optimizer
        order, whole tensors) on rank 0, so train_state.pt does not depend on the mode."""
        if self.mode in ("single", "ddp"):
            return optimizer.state_dict()
        if self.mode == "fsdp":
            return sharded.full_optimizer_state(model, optimizer) or None
        state = optimizer.state_dict()
        for i in self._expert_indices(optimizer):
            # New dicts: state_dict() hands out the optimizer's own per-parameter dicts.
            # Moments: gather the rows; the step count is the same on every rank.
            state["state"][i] = {key: gather_rows(value) if value.dim() > 0 else value
                                 for key, value in state["state"].get(i, {}).items()}
        return state if self.is_main else None

    def load_optimizer_state(self, model: HiMoEModel, optimizer, state: dict) -> None:
        if self.mode in ("single", "ddp"):
            optimizer.load_state_dict(state)
        elif self.mode == "fsdp":
            sharded.load_optimizer_state(model, optimizer, state)
        else:
            for i in self._expert_indices(optimizer):
                for key, value in state["state"].get(i, {}).items():
                    if value.dim() > 0:
                        state["state"][i][key] = expert_parallel.local_rows(
                            value, self.rank, self.world)
            optimizer.load_state_dict(state)

    def _expert_indices(self, optimizer) -> list[int]:
        ids = {id(p) for p in self._experts}
        order = [p for group in optimizer.param_groups for p in group["params"]]
        return [i for i, p in enumerate(order) if id(p) in ids]
