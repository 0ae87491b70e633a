"""Auxiliary routing losses (formulas in the design notes, ROUTING.md). Pure functions of the
router's fp32 logits and probabilities, so each is easy to check by hand.

T tokens, E experts, N groups of M experts (E = N * M), K assignments per token.
"""

from __future__ import annotations

import torch


def switch_loss(probs_TE: torch.Tensor, ids_TK: torch.Tensor,
                target_E: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_i f_i * P_i: f_i = share of assignments (k per token) that went to expert i,
    P_i = mean router probability of i. Equals 1 at perfect balance; gradient flows via P.
    target_E (shares summing to 1): sum_i f_i * P_i / t_i instead, which f = P = t
    minimises (E * sum f P is its case t_i = 1 / E)."""
    E = probs_TE.shape[1]
    counts_E = torch.bincount(ids_TK.reshape(-1), minlength=E).to(probs_TE.dtype)
    fp_E = counts_E / ids_TK.shape[0] * probs_TE.mean(0)
    return E * fp_E.sum() if target_E is None else (fp_E / target_E).sum()


def sequence_switch_loss(probs_TE: torch.Tensor, ids_TK: torch.Tensor,
                         seq_len: int) -> torch.Tensor:
    """switch_loss within each run of seq_len tokens, averaged over the runs (DeepSeek-V3's
    sequence-wise balance loss). A batch can be balanced while each sequence sends its
    tokens to a few experts; this term sees that, the batch-wide one does not."""
    E = probs_TE.shape[1]
    ids_SL = ids_TK.reshape(-1, seq_len * ids_TK.shape[1])  # S sequences, L = their slots
    counts_SE = torch.zeros(ids_SL.shape[0], E, dtype=probs_TE.dtype, device=probs_TE.device)
    counts_SE.scatter_add_(1, ids_SL, torch.ones_like(ids_SL, dtype=probs_TE.dtype))
    f_SE = counts_SE / seq_len
    return E * (f_SE * probs_TE.view(-1, seq_len, E).mean(1)).sum(-1).mean()


def cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """(std / mean)^2 of a vector: 0 when every entry is equal (Shazeer et al. 2017)."""
    return x_E.var(unbiased=False) / x_E.mean().square().clamp_min(1e-10)


def stay_probability(clean_TC: torch.Tensor, noisy_TC: torch.Tensor, k: int,
                     std: float) -> torch.Tensor:
    """Shazeer et al. 2017's smooth load estimate, per token and choice: the probability
    that choice c is among the top k of noisy_TC if only its own noise were drawn again,
    Phi((clean_c - threshold) / std). The threshold is the k-th largest of the other noisy
    logits: the (k+1)-th largest overall for a choice in the top k, the k-th for the rest.
    -inf logits (empty slots) get 0."""
    C = clean_TC.shape[-1]
    if k >= C:
        return (clean_TC > float("-inf")).to(clean_TC.dtype)
    top_TK = noisy_TC.topk(k + 1, dim=-1).values
    kth_T1, next_T1 = top_TK[:, k - 1:k], top_TK[:, k:k + 1]
    threshold_TC = torch.where(noisy_TC >= kth_T1, next_T1, kth_T1)
    z_TC = ((clean_TC - threshold_TC) / std).nan_to_num(nan=float("-inf"))
    return torch.special.ndtr(z_TC)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean_x logsumexp(z)^2: keeps router logits small, so softmax stays well conditioned."""
    return logits_TE.logsumexp(-1).square().mean()


def group_mass(probs_TE: torch.Tensor, num_groups: int) -> torch.Tensor:
    """m_g(x) = sum of the probabilities of group g's experts: [T, N]."""
    return probs_TE.view(probs_TE.shape[0], num_groups, -1).sum(-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def intra_group_reg(probs_TE: torch.Tensor, num_groups: int, form: str = "l2",
                    conditional: bool = False) -> torch.Tensor:
    """Hi-MoE intra-group specialisation, before its coefficient (lambda1). Minimising it
    sharpens the choice of expert: l2 form -mean sum_i pi_i^2, entropy form +mean H(pi).
    conditional: on pi_i / m_g inside each group, which cannot be lowered by piling mass into
    one group (the coupling the plain form has with the inter-group term)."""
    if conditional:
        p_TNM = probs_TE.view(probs_TE.shape[0], num_groups, -1)
        cond_TNM = p_TNM / p_TNM.sum(-1, keepdim=True).clamp_min(1e-12)
        if form == "l2":
            return -cond_TNM.square().sum((1, 2)).mean()
        return entropy(cond_TNM).sum(-1).mean()
    if form == "l2":
        return -probs_TE.square().sum(-1).mean()
    return entropy(probs_TE).mean()


def inter_group_reg(probs_TE: torch.Tensor, num_groups: int, form: str = "l2") -> torch.Tensor:
    """Hi-MoE inter-group balancing, before its coefficient (lambda2). Minimising it spreads
    each token's mass over groups: l2 form +mean sum_g m_g^2, entropy form -mean H(m)."""
    m_TN = group_mass(probs_TE, num_groups)
    if form == "l2":
        return m_TN.square().sum(-1).mean()
    return -entropy(m_TN).mean()
