"""The contract every router keeps, and what routers share.

A router maps tokens to k flat expert ids and k combine weights; the flat id of expert j in
group g is g * M + j, so a single dispatch path serves every router. Routers compute in fp32
whatever the autocast dtype: softmax over small logits is where low precision hurts routing
decisions most. Each router also returns its auxiliary loss terms, already scaled by their
coefficients (only those with a nonzero coefficient).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from himoe.config import ModelConfig
from himoe.model import losses


@dataclass
class Routing:
    ids_TK: torch.Tensor  # int64 flat expert ids
    weights_TK: torch.Tensor  # fp32 combine weights
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # scaled auxiliary terms
    # Mean per-token entropy of the routing distribution (nats), computed on request: only
    # evaluation reads it, and in a training step it would cost ~1% for nothing.
    entropy: Callable[[], float] = lambda: 0.0


def hi_moe_terms(cfg: ModelConfig, probs_TE: torch.Tensor, intra_scale: float) -> dict:
    """The Hi-MoE regularisers on a distribution over all E experts."""
    aux = {}
    if cfg.inter_coef:
        aux["inter"] = cfg.inter_coef * losses.inter_group_reg(probs_TE, cfg.num_moes,
                                                               cfg.reg_form)
    if cfg.intra_coef and intra_scale > 0:
        aux["intra"] = cfg.intra_coef * intra_scale * losses.intra_group_reg(
            probs_TE, cfg.num_moes, cfg.reg_form, cfg.intra_conditional)
    return aux


def sign_update(bias_RC: torch.Tensor, counts_RC: torch.Tensor, rate: float,
                mask_RC: torch.Tensor | None = None,
                target_RC: torch.Tensor | None = None) -> None:
    """Loss-free balancing (DeepSeek-V3): b += rate * sign(mean(c) - c) along each row of
    candidates that compete with each other, then centred so only differences matter.
    mask_RC: the real candidates of ragged rows; empty slots keep bias 0. target_RC: each
    candidate's share of its row (summing to 1; rows without a mask), aimed at instead of
    the mean."""
    if mask_RC is None:
        expected_RC = (counts_RC.mean(-1, keepdim=True) if target_RC is None
                       else counts_RC.sum(-1, keepdim=True) * target_RC)
        bias_RC += rate * torch.sign(expected_RC - counts_RC)
        bias_RC -= bias_RC.mean(-1, keepdim=True)
        return
    m_RC = mask_RC.to(bias_RC.dtype)
    n_R1 = m_RC.sum(-1, keepdim=True)
    mean_R1 = (counts_RC * m_RC).sum(-1, keepdim=True) / n_R1
    bias_RC += rate * torch.sign(mean_R1 - counts_RC) * m_RC
    bias_RC -= (bias_RC * m_RC).sum(-1, keepdim=True) / n_R1 * m_RC
