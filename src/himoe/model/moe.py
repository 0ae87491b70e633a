"""MoELayer = router + expert bank; flattens [B, T, D] to tokens and back."""

from __future__ import annotations

import torch
from torch import nn

from himoe.config import HiMoEConfig
from himoe.model.experts import ExpertBank
from himoe.model.routing import HierarchicalRouter


class MoELayer(nn.Module):
    def __init__(self, cfg: HiMoEConfig):
        super().__init__()
        self.router = HierarchicalRouter(cfg.n_embd, cfg.num_moes, cfg.num_experts,
                                         cfg.top_k_groups, cfg.top_k_experts)
        self.experts = ExpertBank(cfg.total_experts, cfg.n_embd, cfg.ffn_hidden, cfg.n_layer)
        # The last forward's choices, detached: read by balance figures, logs and analysis.
        self.last_ids_TK: torch.Tensor | None = None
        self.last_weights_TK: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        routing = self.router(x_TD)
        self.last_ids_TK, self.last_weights_TK = routing.ids_TK, routing.weights_TK.detach()
        return self.experts(x_TD, routing.ids_TK, routing.weights_TK).view(B, T, D)
