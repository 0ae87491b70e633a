"""The decoder: pre-LayerNorm blocks whose FFN is a hierarchical MoE layer, and generate()."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from himoe.config import ModelConfig
from himoe.model.attention import CausalSelfAttention, KVCache
from himoe.model.experts import DenseFFN
from himoe.model.moe import MoELayer
from himoe.model.routers.registry import router_spec


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg.n_embd, cfg.n_head, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        if router_spec(cfg.router).dense:
            self.ffn = DenseFFN(cfg.n_embd, cfg.ffn_hidden, cfg.n_layer)
        else:
            self.ffn = MoELayer(cfg, layer)
        # A shared expert (DeepSeekMoE) sees every token, so it learns from the whole batch
        # while each routed expert sees its share; it is part of the backbone on disk.
        self.shared_ffn = (DenseFFN(cfg.n_embd, cfg.shared_hidden, cfg.n_layer)
                           if cfg.shared_hidden else None)  # 0 for the dense baseline
        self.ffn_drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD, cache: KVCache | None = None, layer: int = 0):
        x_BTD = x_BTD + self.attn(self.ln1(x_BTD), cache, layer)
        h_BTD = self.ln2(x_BTD)
        y_BTD = self.ffn(h_BTD)
        if self.shared_ffn is not None:
            y_BTD = y_BTD + self.shared_ffn(h_BTD)
        return x_BTD + self.ffn_drop(y_BTD)


class HiMoEModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("cfg.vocab_size must be set from the tokenizer before building")
        # Only the model's own settings, even when given a whole HiMoEConfig: nothing in
        # the model can come to depend on a training or run setting.
        self.cfg = cfg = ModelConfig.of(cfg)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self._init_weights()
        self.lm_head.weight = self.tok_emb.weight  # tied, as the card says

    def _init_weights(self):
        for name, p in self.named_parameters():
            if ".ffn." in name or ".shared_ffn." in name:
                continue  # experts, routers and the shared expert initialise themselves
            if name.endswith(".weight") and p.dim() == 2:
                std = 0.02 / (2 * self.cfg.n_layer) ** 0.5 if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith(".bias") and "ln" not in name:
                nn.init.zeros_(p)

    @property
    def moe_layers(self) -> dict[int, MoELayer]:
        """{block index: its MoE layer}; empty for the dense baseline."""
        return {i: b.ffn for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoELayer)}

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                cache: KVCache | None = None):
        B, T = idx_BT.shape
        past = cache.length if cache is not None else 0
        if past + T > self.cfg.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size "
                             f"{self.cfg.block_size}")
        pos_T = torch.arange(past, past + T, device=idx_BT.device)
        x_BTD = self.drop(self.tok_emb(idx_BT) + self.pos_emb(pos_T))
        for layer, block in enumerate(self.blocks):
            x_BTD = block(x_BTD, cache, layer)
        if cache is not None:
            cache.advance(T)
        logits_BTV = self.lm_head(self.ln_f(x_BTD))
        loss = None
        if targets_BT is not None:
            loss = F.cross_entropy(logits_BTV.float().view(B * T, -1), targets_BT.reshape(-1))
            if self.training:  # auxiliary routing terms train the routers, never evaluate
                aux = [t for moe in self.moe_layers.values() for t in moe.last_aux.values()]
                if aux:
                    loss = loss + torch.stack(aux).sum()
        return logits_BTV, loss

    def aux_losses(self) -> dict[str, float]:
        """The last forward's auxiliary terms, summed over layers, for logging."""
        totals: dict[str, float] = {}
        for moe in self.moe_layers.values():
            for name, value in moe.last_aux.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach())
        return totals

    def update_balance_biases(self, rate_scale: float = 1.0) -> None:
        """Loss-free balancing: after each optimiser step, every router nudges its selection
        biases towards the experts the step under-used, by bias_update_rate * rate_scale
        (the trainer's --bias_rate_schedule)."""
        for moe in self.moe_layers.values():
            if hasattr(moe.router, "update_balance_bias"):
                moe.router.update_balance_bias(rate_scale)

    def set_intra_scale(self, scale: float) -> None:
        """R_intra's warm-up factor (stage 2 of the Hi-MoE schedule), set every step."""
        for moe in self.moe_layers.values():
            moe.router.intra_scale = scale

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token). Active counts the level-1 router, the chosen groups'
        level-2 routers and the chosen experts of each layer, plus everything else."""
        total = sum(p.numel() for p in self.parameters())
        active = total
        cfg = self.cfg
        group_state = {name for _, name in router_spec(cfg.router).group_entries}
        for moe in self.moe_layers.values():
            bank = sum(p.numel() for p in moe.experts.parameters())
            per_expert = bank // cfg.total_experts
            empty = cfg.total_experts - moe.num_real_experts  # slots of ragged groups
            total -= empty * per_expert
            active -= bank - per_expert * cfg.experts_per_token
            for name, p in moe.router.named_parameters():
                if name in group_state:  # only the chosen groups' own routers run
                    total -= empty * (p.numel() // cfg.total_experts)
                    active -= p.numel() - p.numel() // cfg.num_moes * cfg.top_k_groups
        return total, active

    @torch.no_grad()
    def generate(self, idx_BT: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, on_token=None) -> torch.Tensor:
        """Sample max_new_tokens after idx_BT. The context is a window of at most block_size
        tokens; when it is full, it restarts from its last block_size // 2 tokens (the cache
        is refilled from those), so cached and uncached runs see the same context and give
        the same tokens. on_token(next_B1) is called after each token (for streaming)."""
        S = self.cfg.block_size
        keep = max(1, S // 2)
        seq_BL = idx_BT
        start = max(0, seq_BL.shape[1] - S)
        cache = None
        if use_cache:
            p = next(self.parameters())
            cache = KVCache(self.cfg.n_layer, idx_BT.shape[0], self.cfg.n_head, S,
                            self.cfg.n_embd // self.cfg.n_head, p.device, p.dtype)
        for _ in range(max_new_tokens):
            if seq_BL.shape[1] - start >= S + 1:
                start = seq_BL.shape[1] - keep
                if cache is not None:
                    cache.reset()
            if cache is None:
                logits_BTV, _ = self(seq_BL[:, start:])
            else:
                logits_BTV, _ = self(seq_BL[:, start + cache.length:], cache=cache)
            next_B1 = sample_next(logits_BTV[:, -1].float(), temperature, top_k, top_p, generator)
            seq_BL = torch.cat([seq_BL, next_B1], dim=1)
            if on_token is not None:
                on_token(next_B1)
        return seq_BL


def sample_next(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None):
    """One token per row: greedy at temperature 0, else top-k / nucleus sampling."""
    # A temperature below the dtype's smallest normal number is 0 once it meets the logits.
    if temperature < torch.finfo(logits_BV.dtype).tiny:
        return logits_BV.argmax(dim=-1, keepdim=True)
    # The row's top logit shifted to 0 first: a tiny temperature then gives -inf, never the
    # inf that softmax turns into NaN.
    logits_BV = (logits_BV - logits_BV.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = F.softmax(logits_BV, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_BV = sorted_BV.cumsum(-1) - sorted_BV >= top_p
        drop_BV[:, 0] = False  # rounding can leave the first a mass above a tiny top_p
        sorted_BV = sorted_BV.masked_fill(drop_BV, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator)
