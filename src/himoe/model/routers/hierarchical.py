"""The card's two-level router: level 1 picks groups, each group's own router its experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from himoe.config import ModelConfig
from himoe.model import losses
from himoe.model.routers.base import Routing, hi_moe_terms, sign_update


class HierarchicalRouter(nn.Module):
    """Level 1 picks top_k_groups of N groups; each kept group's own router picks
    top_k_experts of its M experts. Combine weight = p1[g] * p2[g, j], so the language-model
    loss reaches both levels (a bare argmax would give neither router any gradient)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.cfg = cfg
        self.main_weight_ND = nn.Parameter(torch.empty(cfg.num_moes, cfg.n_embd))
        self.group_weight_NMD = nn.Parameter(torch.empty(cfg.num_moes, cfg.num_experts,
                                                         cfg.n_embd))
        init = nn.init.zeros_ if cfg.zero_router_init else lambda w: nn.init.normal_(w, std=0.02)
        init(self.main_weight_ND)
        init(self.group_weight_NMD)
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
        # The level-1 load that balancing aims at: cfg.group_shares (merge: the branches'
        # shares of the corpora), or None for equal shares.
        shares_N = torch.tensor(cfg.group_shares, dtype=torch.float32) \
            if cfg.group_shares else None
        self.register_buffer("group_target_N", None if shares_N is None
                             else shares_N / shares_N.sum(), persistent=False)

    def forward(self, x_TD: torch.Tensor, seq_len: int = 0) -> Routing:
        """seq_len: tokens per sequence (x_TD is sequences back to back), for the
        sequence-wise balance loss; only read when cfg.seq_switch_coef is on."""
        cfg = self.cfg
        N, M = cfg.num_moes, cfg.num_experts
        if self.training and cfg.router_jitter:  # Switch Transformer's multiplicative jitter
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - cfg.router_jitter,
                                                          1 + cfg.router_jitter)
        # Both levels' logits, all N*M of level 2 (M is small), in one matmul: on a CPU two
        # skinny matmuls and their backward cost ~2% of a card step more. Only the chosen
        # groups' level-2 rows are kept, so gradient reaches only the routers picked.
        w_CD = torch.cat([self.main_weight_ND, self.group_weight_NMD.reshape(N * M, -1)])
        z_TC = x_TD.float() @ w_CD.float().t()
        logits1_TN, logits2_TNM = z_TC[:, :N], z_TC[:, N:].view(-1, N, M)
        p1_TN = F.softmax(logits1_TN, dim=-1)
        noisy1_TN, pick1_TN = self.noised(logits1_TN, p1_TN)
        g_TG = (pick1_TN + self.group_bias_N).topk(cfg.top_k_groups, dim=-1).indices
        p1_TG = p1_TN.gather(1, g_TG)  # G = top_k_groups; weights never see the bias
        if self.ragged:
            logits2_TNM = logits2_TNM.masked_fill(~self.slot_mask_NM, float("-inf"))
        idx_TGM = g_TG.unsqueeze(-1).expand(-1, -1, M)
        logits2_TGM = logits2_TNM.gather(1, idx_TGM)
        p2_TGM = F.softmax(logits2_TGM, dim=-1)
        noisy2_TGM, pick2_TGM = self.noised(logits2_TGM, p2_TGM)
        score_TGM = pick2_TGM + self.expert_bias_E.view(N, M)[g_TG]
        if self.ragged:  # an empty slot's p2 is 0, but its bias 0 can beat a negative one
            score_TGM = score_TGM.masked_fill(~self.slot_mask_NM[g_TG], float("-inf"))
        j_TGJ = score_TGM.topk(cfg.top_k_experts, dim=-1).indices  # J = top_k_experts
        p2_TGJ = p2_TGM.gather(2, j_TGJ)
        ids_TK = (g_TG.unsqueeze(-1) * M + j_TGJ).flatten(1)
        weights_TK = (p1_TG.unsqueeze(-1) * p2_TGJ).flatten(1)
        if self.training and cfg.bias_update_rate:
            self.group_counts_N += torch.bincount(g_TG.reshape(-1), minlength=N)
            self.expert_counts_E += torch.bincount(ids_TK.reshape(-1), minlength=N * M)
        aux = {}
        if cfg.switch_coef:
            aux["switch"] = cfg.switch_coef * two_level_switch_loss(
                p1_TN, g_TG, p2_TGM, j_TGJ, self.group_sizes_N, self.group_target_N)
        if cfg.importance_coef:
            importance_E = torch.zeros(N * M, dtype=weights_TK.dtype, device=x_TD.device)
            importance_E = importance_E.index_add(0, ids_TK.reshape(-1), weights_TK.reshape(-1))
            aux["importance"] = cfg.importance_coef * losses.cv_squared(
                importance_E[self.slot_mask_NM.reshape(-1)])
        if cfg.load_coef:
            aux["load"] = cfg.load_coef * losses.cv_squared(two_level_load(
                cfg, logits1_TN, noisy1_TN, g_TG, logits2_TGM, noisy2_TGM
            )[self.slot_mask_NM.reshape(-1)])
        if cfg.z_coef:
            aux["z"] = cfg.z_coef * (losses.z_loss(logits1_TN)
                                     + losses.z_loss(logits2_TGM.reshape(-1, M)))  # -inf: exp 0
        if cfg.inter_coef or cfg.intra_coef or cfg.seq_switch_coef:
            # The joint distribution over all experts: pi[g*M + j] = p1[g] * p2[g, j].
            pi_TE = (p1_TN.unsqueeze(-1) * F.softmax(logits2_TNM, dim=-1)).flatten(1)
            aux |= hi_moe_terms(cfg, pi_TE, self.intra_scale)
            if cfg.seq_switch_coef:
                aux["seq_switch"] = cfg.seq_switch_coef * losses.sequence_switch_loss(
                    pi_TE, ids_TK, seq_len or len(x_TD))
        p1_TN, logits2_TNM = p1_TN.detach(), logits2_TNM.detach()
        return Routing(ids_TK, weights_TK, aux, lambda: routing_entropy(p1_TN, logits2_TNM))

    def noised(self, logits: torch.Tensor, probs: torch.Tensor):
        """(logits, probabilities) the top-k choice reads: with noisy gating in training, the
        logits plus Gaussian noise and their softmax; else the clean ones. Noise moves which
        choices are taken, never the combine weights."""
        if not (self.training and self.cfg.noisy_gating > 0):
            return logits, probs
        noisy = logits + self.cfg.noisy_gating * torch.randn_like(logits)
        return noisy, F.softmax(noisy, dim=-1)

    @torch.no_grad()
    def update_balance_bias(self, rate_scale: float = 1.0) -> None:
        """After an optimiser step: favour groups (towards cfg.group_shares, if set), and
        experts within each group, that got less than their share of the step's
        assignments."""
        rate, M = self.cfg.bias_update_rate * rate_scale, self.cfg.num_experts
        sign_update(self.group_bias_N.view(1, -1), self.group_counts_N.view(1, -1), rate,
                    target_RC=None if self.group_target_N is None
                    else self.group_target_N.view(1, -1))
        sign_update(self.expert_bias_E.view(-1, M), self.expert_counts_E.view(-1, M), rate,
                    self.slot_mask_NM if self.ragged else None)
        self.group_counts_N.zero_()
        self.expert_counts_E.zero_()


def routing_entropy(p1_TN: torch.Tensor, logits2_TNM: torch.Tensor) -> float:
    """Mean entropy of the joint routing distribution p1[g] * p2[g, j] (nats)."""
    joint_TE = (p1_TN.unsqueeze(-1) * F.softmax(logits2_TNM, dim=-1)).flatten(1)
    return float(losses.entropy(joint_TE).mean())


def two_level_load(cfg: ModelConfig, logits1_TN, noisy1_TN, g_TG, logits2_TGM,
                   noisy2_TGM) -> torch.Tensor:
    """Shazeer et al. 2017's load of each expert in a two-level MoE, [N * M]: group g's
    smooth load times, over the tokens that reached g, expert j's smooth load within g per
    token, Load_1[g] * Load_2[g, j] / |X_g|."""
    N, M, std = cfg.num_moes, cfg.num_experts, cfg.noisy_gating
    load1_N = losses.stay_probability(logits1_TN, noisy1_TN, cfg.top_k_groups, std).sum(0)
    stay2_SM = losses.stay_probability(logits2_TGM.reshape(-1, M), noisy2_TGM.reshape(-1, M),
                                       cfg.top_k_experts, std)
    group_S = g_TG.reshape(-1)  # one row per (token, chosen group)
    load2_NM = torch.zeros(N, M, dtype=stay2_SM.dtype, device=stay2_SM.device).index_add(
        0, group_S, stay2_SM)
    reached_N = torch.bincount(group_S, minlength=N).clamp_min(1).to(load2_NM.dtype)
    return (load1_N[:, None] * load2_NM / reached_N[:, None]).reshape(-1)


def two_level_switch_loss(p1_TN, g_TG, p2_TGM, j_TGJ, sizes_N,
                          target_N: torch.Tensor | None = None) -> torch.Tensor:
    """Switch loss at both levels: N * sum_g f_g P_g over groups (with target_N,
    switch_loss's form that aims at those shares), plus for each group
    M_g * sum_j f_{j|g} P_{j|g} over the tokens that reached it, weighted by its share
    (M_g = sizes_N[g], its expert count)."""
    N, M = p1_TN.shape[1], p2_TGM.shape[2]
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
    return losses.switch_loss(p1_TN, g_TG, target_N) + (
        share_N * sizes_N * (f_NM * P_NM).sum(-1)).sum()
