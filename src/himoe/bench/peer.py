"""The peer on the training step: Hugging Face transformers' Qwen2-MoE, its experts on
`grouped_mm`, at himoe's default's parameters and active FFN FLOPs (`himoe bench --only peer`).

Qwen2-MoE is a flat top-k MoE with a gated shared expert, SwiGLU experts without biases,
RMSNorm and rotary positions. Matched to the default (2 layers, n_embd 256, 48 experts of
which 2 per token, each 256 -> 256 -> 256 GELU, a 512-wide shared expert): a SwiGLU expert
of width 2/3 * F has the parameters and multiply-adds of a GELU expert of width F, so the
experts are 168 wide (2/3 * 256 rounded to a multiple of 8, as grouped_mm wants) and the
shared one 341. Both sides train with AdamW (fused, the same betas, rate and weight decay)
and the same gradient clip; Qwen2-MoE adds its own Switch-style balancing loss
(router_aux_loss_coef), as himoe's default adds its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from himoe.config import HiMoEConfig
from himoe.training.optim import clip_grad_norm, lr_at


def qwen2_moe_config(cfg: HiMoEConfig):
    """A transformers Qwen2MoeConfig at cfg's shape; raises ImportError without transformers."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.block_size, tie_word_embeddings=True,
        num_experts=cfg.total_experts, num_experts_per_tok=cfg.experts_per_token,
        # grouped_mm wants each row a whole number of 16-byte units (8 bf16 values), so
        # the experts' width is rounded to a multiple of 8: within 2% of the match.
        moe_intermediate_size=8 * round(2 * cfg.ffn_hidden / 3 / 8),
        shared_expert_intermediate_size=round(2 * cfg.shared_hidden / 3),
        decoder_sparse_step=1,
        output_router_logits=True, router_aux_loss_coef=cfg.switch_coef,
        attention_dropout=cfg.dropout, use_cache=False, experts_implementation="grouped_mm")


class QwenMoeSide:
    """Qwen2MoeForCausalLM and its optimiser; `step` is one training step as himoe's."""

    def __init__(self, cfg: HiMoEConfig, seed: int = 1337):
        from transformers import Qwen2MoeForCausalLM

        torch.manual_seed(seed)
        self.cfg = cfg
        self.model = Qwen2MoeForCausalLM(qwen2_moe_config(cfg)).train()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
            fused=True)
        self.params = list(self.model.parameters())
        self.steps_done = 0

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def step(self, x_BT: torch.Tensor, y_BT: torch.Tensor) -> float:
        """Forward, backward, clip, AdamW, zero_grad at the schedule's rate, as train_step."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.steps_done, self.cfg)
        self.steps_done += 1
        out = self.model(input_ids=x_BT)
        # The targets are y itself (himoe's batches are already shifted by one), so the
        # loss is computed here rather than from Qwen's `labels`, which it would shift again.
        loss = F.cross_entropy(out.logits.flatten(0, 1), y_BT.flatten())
        loss = loss + self.model.router_aux_loss_coef * out.aux_loss
        loss.backward()
        clip_grad_norm(self.params, self.cfg.grad_clip, self.optimizer)
        self.optimizer.step()
        self.optimizer.grad_scale = None  # a clip left to the fused step: applied once
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()
