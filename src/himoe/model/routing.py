"""Routers: each maps tokens to k flat expert ids and k combine weights.

Flat id of expert j in group g is g * M + j, so a single dispatch path serves every router.
Routers compute in fp32 whatever the autocast dtype: softmax over small logits is where
low precision hurts routing decisions most. Each router also returns its auxiliary loss
terms, already scaled by their coefficients (only those with a nonzero coefficient).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from himoe.config import HiMoEConfig
from himoe.distributed.collectives import mean_over_ranks
from himoe.model import losses
from himoe.model.routers.registry import router_spec


@dataclass
class Routing:
    ids_TK: torch.Tensor  # int64 flat expert ids
    weights_TK: torch.Tensor  # fp32 combine weights
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # scaled auxiliary terms
    # Mean per-token entropy of the routing distribution (nats), computed on request: only
    # evaluation reads it, and in a training step it would cost ~1% for nothing.
    entropy: Callable[[], float] = lambda: 0.0


def hi_moe_terms(cfg: HiMoEConfig, probs_TE: torch.Tensor, intra_scale: float) -> dict:
    """The Hi-MoE regularisers on a distribution over all E experts."""
    aux = {}
    if cfg.inter_coef:
        aux["inter"] = cfg.inter_coef * losses.inter_group_reg(probs_TE, cfg.num_moes,
                                                               cfg.reg_form)
    if cfg.intra_coef and intra_scale > 0:
        aux["intra"] = cfg.intra_coef * intra_scale * losses.intra_group_reg(
            probs_TE, cfg.num_moes, cfg.reg_form, cfg.intra_conditional)
    return aux


def flat_router_terms(cfg: HiMoEConfig, z_TE: torch.Tensor, p_TE: torch.Tensor,
                      ids_TK: torch.Tensor, intra_scale: float) -> dict:
    """Switch, z-loss and the Hi-MoE terms of a router with one softmax over all experts:
    z_TE its logits, p_TE = softmax(z_TE), ids_TK its choices."""
    aux = {}
    if cfg.switch_coef:
        aux["switch"] = cfg.switch_coef * losses.switch_loss(p_TE, ids_TK)
    if cfg.z_coef:
        aux["z"] = cfg.z_coef * losses.z_loss(z_TE)
    return aux | hi_moe_terms(cfg, p_TE, intra_scale)


class HierarchicalRouter(nn.Module):
    """Level 1 picks top_k_groups of N groups; each kept group's own router picks
    top_k_experts of its M experts. Combine weight = p1[g] * p2[g, j], so the language-model
    loss reaches both levels (a bare argmax would give neither router any gradient)."""

    def __init__(self, cfg: HiMoEConfig, layer: int = 0):
        super().__init__()
        self.cfg = cfg
        self.main_weight_ND = nn.Parameter(torch.empty(cfg.num_moes, cfg.n_embd))
        self.group_weight_NMD = nn.Parameter(torch.empty(cfg.num_moes, cfg.num_experts,
                                                         cfg.n_embd))
        nn.init.normal_(self.main_weight_ND, std=0.02)
        nn.init.normal_(self.group_weight_NMD, std=0.02)
        self.intra_scale = 1.0  # set by the trainer for the R_intra warm-up
        # Loss-free balancing: selection biases for groups and for experts within groups.
        self.register_buffer("group_bias_N", torch.zeros(cfg.num_moes))
        self.register_buffer("expert_bias_E", torch.zeros(cfg.total_experts))
        self.register_buffer("group_counts_N", torch.zeros(cfg.num_moes), persistent=False)
        self.register_buffer("expert_counts_E", torch.zeros(cfg.total_experts),
                             persistent=False)
        # Groups of different sizes (after `himoe experts add`): the empty slots of the
        # smaller groups get logit -inf, so probability 0 and never picked.
        sizes_N = torch.tensor(cfg.group_sizes(layer), dtype=torch.float32)
        self.register_buffer("group_sizes_N", sizes_N, persistent=False)
        self.register_buffer("slot_mask_NM", torch.arange(cfg.num_experts) < sizes_N[:, None],
                             persistent=False)
        self.ragged = min(cfg.group_sizes(layer)) < cfg.num_experts  # no tensor read: may be meta

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.cfg
        N, M = cfg.num_moes, cfg.num_experts
        # Both levels' logits, all N*M of level 2 (M is small), in one matmul: on a CPU two
        # skinny matmuls and their backward cost ~2% of a card step more. Only the chosen
        # groups' level-2 rows are kept, so gradient reaches only the routers picked.
        w_CD = torch.cat([self.main_weight_ND, self.group_weight_NMD.reshape(N * M, -1)])
        z_TC = x_TD.float() @ w_CD.float().t()
        logits1_TN, logits2_TNM = z_TC[:, :N], z_TC[:, N:].view(-1, N, M)
        p1_TN = F.softmax(logits1_TN, dim=-1)
        g_TG = (p1_TN + self.group_bias_N).topk(cfg.top_k_groups, dim=-1).indices
        p1_TG = p1_TN.gather(1, g_TG)  # G = top_k_groups; weights never see the bias
        if self.ragged:
            logits2_TNM = logits2_TNM.masked_fill(~self.slot_mask_NM, float("-inf"))
        idx_TGM = g_TG.unsqueeze(-1).expand(-1, -1, M)
        logits2_TGM = logits2_TNM.gather(1, idx_TGM)
        p2_TGM = F.softmax(logits2_TGM, dim=-1)
        bias_TGM = self.expert_bias_E.view(N, M)[g_TG]
        j_TGJ = (p2_TGM + bias_TGM).topk(cfg.top_k_experts, dim=-1).indices  # J = top_k_experts
        p2_TGJ = p2_TGM.gather(2, j_TGJ)
        ids_TK = (g_TG.unsqueeze(-1) * M + j_TGJ).flatten(1)
        weights_TK = (p1_TG.unsqueeze(-1) * p2_TGJ).flatten(1)
        if self.training and cfg.bias_update_rate:
            self.group_counts_N += torch.bincount(g_TG.reshape(-1), minlength=N)
            self.expert_counts_E += torch.bincount(ids_TK.reshape(-1), minlength=N * M)
        aux = {}
        if cfg.switch_coef:
            aux["switch"] = cfg.switch_coef * two_level_switch_loss(p1_TN, g_TG, p2_TGM, j_TGJ,
                                                                    self.group_sizes_N)
        if cfg.z_coef:
            aux["z"] = cfg.z_coef * (losses.z_loss(logits1_TN)
                                     + losses.z_loss(logits2_TGM.reshape(-1, M)))  # -inf: exp 0
        if cfg.inter_coef or cfg.intra_coef:
            # The joint distribution over all experts: pi[g*M + j] = p1[g] * p2[g, j].
            pi_TE = (p1_TN.unsqueeze(-1) * F.softmax(logits2_TNM, dim=-1)).flatten(1)
            aux |= hi_moe_terms(cfg, pi_TE, self.intra_scale)
        p1_TN, logits2_TNM = p1_TN.detach(), logits2_TNM.detach()
        return Routing(ids_TK, weights_TK, aux, lambda: routing_entropy(p1_TN, logits2_TNM))

    @torch.no_grad()
    def update_balance_bias(self) -> None:
        """After an optimiser step: favour groups, and experts within each group, that got
        less than their share of the step's assignments."""
        rate, M = self.cfg.bias_update_rate, self.cfg.num_experts
        sign_update(self.group_bias_N.view(1, -1), self.group_counts_N.view(1, -1), rate)
        sign_update(self.expert_bias_E.view(-1, M), self.expert_counts_E.view(-1, M), rate,
                    self.slot_mask_NM if self.ragged else None)
        self.group_counts_N.zero_()
        self.expert_counts_E.zero_()


def sign_update(bias_RC: torch.Tensor, counts_RC: torch.Tensor, rate: float,
                mask_RC: torch.Tensor | None = None) -> None:
    """Loss-free balancing (DeepSeek-V3): b += rate * sign(mean(c) - c) along each row of
    candidates that compete with each other, then centred so only differences matter.
    mask_RC: the real candidates of ragged rows; empty slots keep bias 0."""
    if mask_RC is None:
        bias_RC += rate * torch.sign(counts_RC.mean(-1, keepdim=True) - counts_RC)
        bias_RC -= bias_RC.mean(-1, keepdim=True)
        return
    m_RC = mask_RC.to(bias_RC.dtype)
    n_R1 = m_RC.sum(-1, keepdim=True)
    mean_R1 = (counts_RC * m_RC).sum(-1, keepdim=True) / n_R1
    bias_RC += rate * torch.sign(mean_R1 - counts_RC) * m_RC
    bias_RC -= (bias_RC * m_RC).sum(-1, keepdim=True) / n_R1 * m_RC


def routing_entropy(p1_TN: torch.Tensor, logits2_TNM: torch.Tensor) -> float:
    """Mean entropy of the joint routing distribution p1[g] * p2[g, j] (nats)."""
    joint_TE = (p1_TN.unsqueeze(-1) * F.softmax(logits2_TNM, dim=-1)).flatten(1)
    return float(losses.entropy(joint_TE).mean())


def two_level_switch_loss(p1_TN, g_TG, p2_TGM, j_TGJ, sizes_N) -> torch.Tensor:
    """Switch loss at both levels: N * sum_g f_g P_g over groups, plus for each group
    M_g * sum_j f_{j|g} P_{j|g} over the tokens that reached it, weighted by its share
    (M_g = sizes_N[g], its expert count)."""
    N, M = p1_TN.shape[1], p2_TGM.shape[2]
    level1 = losses.switch_loss(p1_TN, g_TG)
    group_S = g_TG.reshape(-1)  # one row per (token, chosen group)
    p2_SM = p2_TGM.reshape(-1, M)
    n_N = torch.bincount(group_S, minlength=N).to(p2_SM.dtype)
    prob_sum_NM = torch.zeros(N, M, dtype=p2_SM.dtype, device=p2_SM.device).index_add(
        0, group_S, p2_SM)
    picks_NM = torch.zeros(N * M, dtype=p2_SM.dtype, device=p2_SM.device).index_add(
        0, (g_TG.unsqueeze(-1) * M + j_TGJ).reshape(-1),
        torch.ones(j_TGJ.numel(), dtype=p2_SM.dtype, device=p2_SM.device)).view(N, M)
    n_safe_N = n_N.clamp_min(1)
    f_NM = picks_NM / (n_safe_N * j_TGJ.shape[-1]).unsqueeze(-1)
    P_NM = prob_sum_NM / n_safe_N.unsqueeze(-1)
    share_N = n_N / n_N.sum()
    return level1 + (share_N * sizes_N * (f_NM * P_NM).sum(-1)).sum()


class FlatGate(nn.Module):
    """A gate with one set of logits over all E experts, z = W x in fp32: the base of the
    grouped, top-k and group-limited routers."""

    def __init__(self, cfg: HiMoEConfig):
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

    def __init__(self, cfg: HiMoEConfig):
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

    def __init__(self, cfg: HiMoEConfig):
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
    def update_balance_bias(self) -> None:
        sign_update(self.expert_bias_E.view(1, -1), self.expert_counts_E.view(1, -1),
                    self.cfg.bias_update_rate)
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


def build_router(cfg: HiMoEConfig, layer: int = 0) -> nn.Module:
    """The router of MoE layer `layer` (0-based), of the type cfg.router names."""
    return router_spec(cfg.router).build(cfg, layer)
