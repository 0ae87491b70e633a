"""Routers: each maps tokens to k flat expert ids and k combine weights.

Flat id of expert j in group g is g * M + j, so a single dispatch path serves every router.
Routers compute in fp32 whatever the autocast dtype: softmax over small logits is where
low precision hurts routing decisions most.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    ids_TK: torch.Tensor  # int64 flat expert ids
    weights_TK: torch.Tensor  # fp32 combine weights
    group_probs_TN: torch.Tensor  # level-1 probabilities (for balance figures and losses)


class HierarchicalRouter(nn.Module):
    """Level 1 picks top_k_groups of N groups; each kept group's own router picks
    top_k_experts of its M experts. Combine weight = p1[g] * p2[g, j], so the language-model
    loss reaches both levels (a bare argmax would give neither router any gradient)."""

    def __init__(self, n_embd: int, num_groups: int, num_experts: int,
                 top_k_groups: int = 1, top_k_experts: int = 1):
        super().__init__()
        self.num_groups, self.num_experts = num_groups, num_experts
        self.top_k_groups, self.top_k_experts = top_k_groups, top_k_experts
        self.main_weight_ND = nn.Parameter(torch.empty(num_groups, n_embd))
        self.group_weight_NMD = nn.Parameter(torch.empty(num_groups, num_experts, n_embd))
        nn.init.normal_(self.main_weight_ND, std=0.02)
        nn.init.normal_(self.group_weight_NMD, std=0.02)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        N, M = self.num_groups, self.num_experts
        x32_TD = x_TD.float()
        p1_TN = F.softmax(x32_TD @ self.main_weight_ND.float().t(), dim=-1)
        p1_TG, g_TG = p1_TN.topk(self.top_k_groups, dim=-1)  # G = top_k_groups
        # All N*M level-2 logits in one matmul (M is small), then keep the chosen groups' rows:
        # gradient reaches only the routers of the groups that were picked.
        logits2_TNM = (x32_TD @ self.group_weight_NMD.float().reshape(N * M, -1).t()).view(-1, N, M)
        idx_TGM = g_TG.unsqueeze(-1).expand(-1, -1, M)
        p2_TGM = F.softmax(logits2_TNM.gather(1, idx_TGM), dim=-1)
        p2_TGJ, j_TGJ = p2_TGM.topk(self.top_k_experts, dim=-1)  # J = top_k_experts
        ids_TK = (g_TG.unsqueeze(-1) * M + j_TGJ).flatten(1)
        weights_TK = (p1_TG.unsqueeze(-1) * p2_TGJ).flatten(1)
        return Routing(ids_TK, weights_TK, p1_TN)
