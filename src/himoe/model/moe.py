"""MoELayer = router + expert bank; flattens [B, T, D] to tokens and back."""

from __future__ import annotations

import math

import torch
from torch import nn

from himoe.config import ModelConfig
from himoe.model.experts import ExpertBank
from himoe.model.routers.registry import build_router


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.router = build_router(cfg, layer)
        self.experts = ExpertBank(cfg.total_experts, cfg.n_embd, cfg.ffn_hidden, cfg.n_layer)
        self.capacity_factor = cfg.capacity_factor
        self.seq_balanced = cfg.seq_switch_coef > 0
        self.num_real_experts = len(cfg.real_slots(layer))  # fewer than E with ragged groups
        # The last forward's choices, detached: read by balance figures, logs and analysis.
        self.last_ids_TK: torch.Tensor | None = None
        self.last_weights_TK: torch.Tensor | None = None
        self.last_dropped = 0  # assignments over capacity in the last forward
        self.last_aux: dict[str, torch.Tensor] = {}  # scaled auxiliary losses, with grad
        self._entropy = lambda: 0.0

    @property
    def last_entropy(self) -> float:
        """Mean per-token entropy of the last forward's routing distribution (nats)."""
        return self._entropy()

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        # Only routers that take a sequence-wise loss are told where sequences end.
        routing = self.router(x_TD, seq_len=T) if self.seq_balanced else self.router(x_TD)
        self.last_aux, self._entropy = routing.aux, routing.entropy
        ids_TK = routing.ids_TK
        if self.capacity_factor > 0:
            ids_TK = apply_capacity(ids_TK, routing.weights_TK.detach(),
                                    self.num_real_experts, self.capacity_factor)
            self.last_dropped = int((ids_TK < 0).sum())
        self.last_ids_TK, self.last_weights_TK = routing.ids_TK, routing.weights_TK.detach()
        y_TD = self.experts(x_TD, ids_TK, routing.weights_TK, self.last_dropped)
        return y_TD.view(B, T, D)


def apply_capacity(ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int,
                   capacity_factor: float) -> torch.Tensor:
    """Each of the num_experts experts takes at most ceil(capacity_factor * T * K / num_experts)
    assignments (ids may index more slots, when ragged groups leave some empty). Drop policy:
    an expert over capacity keeps its highest-weight assignments (ties: earlier tokens) and
    the rest get id -1, so those tokens skip that expert and pass on through the residual."""
    flat_ids_S, flat_w_S = ids_TK.reshape(-1), weights_TK.reshape(-1)
    capacity = math.ceil(capacity_factor * flat_ids_S.numel() / num_experts)
    by_weight_S = flat_w_S.argsort(descending=True, stable=True)
    order_S = by_weight_S[flat_ids_S[by_weight_S].argsort(stable=True)]  # expert, then weight
    counts_E = torch.bincount(flat_ids_S)
    rank_S = torch.arange(len(order_S), device=ids_TK.device) - (counts_E.cumsum(0) - counts_E)[
        flat_ids_S[order_S]]
    dropped_ids_S = flat_ids_S.clone()
    dropped_ids_S[order_S[rank_S >= capacity]] = -1
    return dropped_ids_S.view_as(ids_TK)
