"""Causal self-attention on scaled_dot_product_attention, with an optional KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Preallocated keys and values for every layer: [B, H, S, Dh] each, S = block_size."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 device, dtype):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k_LBHSd = torch.zeros(shape, device=device, dtype=dtype)
        self.v_LBHSd = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens already cached (same for every layer)
        self.max_len = max_len

    def append(self, layer: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor):
        start, end = self.length, self.length + k_BHTd.shape[2]
        self.k_LBHSd[layer, :, :, start:end] = k_BHTd
        self.v_LBHSd[layer, :, :, start:end] = v_BHTd
        return self.k_LBHSd[layer, :, :, :end], self.v_LBHSd[layer, :, :, :end]

    def advance(self, n: int):
        self.length += n

    def reset(self):
        self.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x_BTD: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split(D, dim=2)
        q_BHTd, k_BHTd, v_BHTd = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
                                  for t in (q, k, v))
        past = 0
        if cache is not None:
            past = cache.length
            k_BHTd, v_BHTd = cache.append(layer, k_BHTd, v_BHTd)
        attn_mask = None
        if past > 0 and T > 1:
            # New tokens see every cached token and the new ones causally.
            attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=x_BTD.device).tril(past)
        y_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BHTd, v_BHTd, attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and past == 0 and T > 1,
        )
        y_BTD = y_BHTd.transpose(1, 2).reshape(B, T, D)
        return self.resid_drop(self.proj(y_BTD))
