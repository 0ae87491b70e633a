"""Routers with one set of logits over all E experts: grouped (Hi-MoE), top-k (MiniMoE,
OLMoE) and group-limited (DeepSeek-V3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from himoe.config import ModelConfig
from himoe.distributed.collectives import mean_over_ranks
from himoe.model import losses
from himoe.model.routers.base import Routing, hi_moe_terms, sign_update


def flat_router_terms(cfg: ModelConfig, z_TE: torch.Tensor, p_TE: torch.Tensor,
                      ids_TK: torch.Tensor, intra_scale: float) -> dict:
    """Switch, z-loss and the Hi-MoE terms of a router with one softmax over all experts:
    z_TE its logits, p_TE = softmax(z_TE), ids_TK its choices."""
    aux = {}
    if cfg.switch_coef:
        aux["switch"] = cfg.switch_coef * losses.switch_loss(p_TE, ids_TK)
    if cfg.z_coef:
        aux["z"] = cfg.z_coef * losses.z_loss(z_TE)
    return aux | hi_moe_terms(cfg, p_TE, intra_scale)


class FlatGate(nn.Module):
    """A gate with one set of logits over all E experts, z = W x in fp32: the base of the
    grouped, top-k and group-limited routers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight_ED = nn.Parameter(torch.empty(cfg.total_experts, cfg.n_embd))
        nn.init.normal_(self.weight_ED, std=0.02)
        self.intra_scale = 1.0  # set by the trainer for the R_intra warm-up

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return x_TD.float() @ self.weight_ED.float().t()


class GroupedRouter(FlatGate):
    """The Hi-MoE paper's router: one softmax over all E experts with a bias correction from
    an EMA of the logits (training only), the top top_k_experts inside every group (so every
    group gets the same traffic by construction), weights renormalised over the chosen
    experts and multiplied by a learnable per-expert scale."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.expert_scale_E = nn.Parameter(torch.ones(cfg.total_experts))
        self.register_buffer("logit_ema_E", torch.zeros(cfg.total_experts))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.cfg
        N, M = cfg.num_moes, cfg.num_experts
        z_TE = self.logits(x_TD)
        if self.training:
            with torch.no_grad():  # updated before use, as in the reference code
                # Mean over all ranks' tokens: every rank keeps the same EMA (himoe.distributed).
                mean_E = mean_over_ranks(z_TE.mean(0))
                self.logit_ema_E.mul_(cfg.ema_beta).add_((1 - cfg.ema_beta) * mean_E)
            pi_TE = F.softmax((z_TE - cfg.bias_tau * self.logit_ema_E) / cfg.router_temp, -1)
        else:
            pi_TE = F.softmax(z_TE / cfg.router_temp, -1)
        top_TNJ, j_TNJ = pi_TE.view(-1, N, M).topk(cfg.top_k_experts, dim=-1)
        group_N11 = torch.arange(N, device=x_TD.device).view(1, N, 1)
        ids_TK = (group_N11 * M + j_TNJ).flatten(1)
        weights_TK = top_TNJ.flatten(1)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True) * self.expert_scale_E[ids_TK]
        aux = flat_router_terms(cfg, z_TE, F.softmax(z_TE, -1), ids_TK, self.intra_scale)
        pi_TE = pi_TE.detach()
        return Routing(ids_TK, weights_TK, aux, lambda: float(losses.entropy(pi_TE).mean()))


class TopKRouter(FlatGate):
    """Flat top-k over all E experts (MiniMoE, OLMoE): p = softmax(W x), keep the top k.
    OLMoE keeps the raw probabilities as weights, MiniMoE-style code renormalises them over
    the kept experts: cfg.renormalize. With loss-free balancing (cfg.bias_update_rate > 0)
    the selection is on p + b, the weights on p alone."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.register_buffer("expert_bias_E", torch.zeros(cfg.total_experts))
        self.register_buffer("expert_counts_E", torch.zeros(cfg.total_experts),
                             persistent=False)

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        return scores_TE.topk(self.cfg.top_k_experts, dim=-1).indices

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.cfg
        z_TE = self.logits(x_TD)
        p_TE = F.softmax(z_TE, -1)
        ids_TK = self.select(p_TE + self.expert_bias_E)
        weights_TK = p_TE.gather(1, ids_TK)
        if cfg.renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        if self.training and cfg.bias_update_rate:
            self.expert_counts_E += torch.bincount(ids_TK.reshape(-1), minlength=cfg.total_experts)
        aux = flat_router_terms(cfg, z_TE, p_TE, ids_TK, self.intra_scale)
        p_TE = p_TE.detach()
        return Routing(ids_TK, weights_TK, aux, lambda: float(losses.entropy(p_TE).mean()))

    @torch.no_grad()
    def update_balance_bias(self, rate_scale: float = 1.0) -> None:
        sign_update(self.expert_bias_E.view(1, -1), self.expert_counts_E.view(1, -1),
                    self.cfg.bias_update_rate * rate_scale)
        self.expert_counts_E.zero_()


class GroupLimitedRouter(TopKRouter):
    """DeepSeek-V3's group-limited selection, itself a two-level router: a group's score is
    the sum of its two best (biased) expert scores; keep top_k_groups groups, then the top
    top_k_experts experts among theirs."""

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        N, M = cfg.num_moes, cfg.num_experts
        scores_TNM = scores_TE.view(-1, N, M)
        group_score_TN = scores_TNM.topk(min(2, M), dim=-1).values.sum(-1)
        keep_TG = group_score_TN.topk(cfg.top_k_groups, dim=-1).indices
        keep_TN = torch.zeros_like(group_score_TN, dtype=torch.bool).scatter_(1, keep_TG, True)
        masked_TE = scores_TNM.masked_fill(~keep_TN.unsqueeze(-1), float("-inf")).flatten(1)
        return masked_TE.topk(cfg.top_k_experts, dim=-1).indices
