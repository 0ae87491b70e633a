"""Expert FFNs: one stacked bank per layer, run as a grouped matmul over sorted tokens.

In memory the E experts of a layer are stacked tensors (w1_EDF, w2_EFD), so one grouped
matmul runs them all; on disk each expert is its own file (see himoe.checkpoint).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether F.grouped_mm runs forward and backward here; probed once per device and dtype."""
    grouped_mm = getattr(F, "grouped_mm", None)
    if grouped_mm is None:
        return False
    try:
        # Sizes that are multiples of 16 bytes; one empty group, as real batches have.
        # Values from a private generator: the probe must not move the global RNG streams.
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(8, 16, generator=gen).to(device_type, dtype).requires_grad_()
        w = torch.randn(3, 16, 16, generator=gen).to(device_type, dtype).requires_grad_()
        offs = torch.tensor([3, 3, 8], device=device_type, dtype=torch.int32)
        y = grouped_mm(x, w, offs=offs)
        y.backward(torch.ones_like(y))
        ref = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
        return bool(torch.allclose(y.float(), ref.float(), atol=1e-2, rtol=1e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def segment_matmul(x_SI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor,
                   use_grouped_mm: bool) -> torch.Tensor:
    """Rows of x_SI are sorted by expert; counts_E rows belong to each expert in turn."""
    if use_grouped_mm:
        offs_E = counts_E.cumsum(0).to(torch.int32)
        y_SO = F.grouped_mm(x_SI, w_EIO, offs=offs_E)
        if y_SO.requires_grad:
            # grouped_mm's backward rejects non-contiguous (e.g. broadcast) gradients.
            y_SO.register_hook(lambda g: g.contiguous())
        return y_SO
    # unbind, not w_EIO[e]: indexing per expert would build a full-size gradient each time.
    pieces = [x @ w for x, w in zip(x_SI.split(counts_E.tolist()), w_EIO.unbind(0))]
    return torch.cat(pieces)


class ExpertBank(nn.Module):
    """E two-layer GELU FFNs (D -> F -> D) with biases, stored stacked."""

    def __init__(self, num_experts: int, n_embd: int, hidden: int, n_layer: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, n_embd, hidden))
        self.b1_EF = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden, n_embd))
        self.b2_ED = nn.Parameter(torch.zeros(num_experts, n_embd))
        nn.init.normal_(self.w1_EDF, std=0.02)
        nn.init.normal_(self.w2_EFD, std=0.02 / (2 * n_layer) ** 0.5)

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor,
                weights_TK: torch.Tensor) -> torch.Tensor:
        """y[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t]); dropless."""
        K = ids_TK.shape[1]
        flat_ids_S = ids_TK.reshape(-1)  # S = T * K assignments
        order_S = flat_ids_S.argsort(stable=True)
        sorted_ids_S = flat_ids_S[order_S]
        token_S = order_S // K
        counts_E = torch.bincount(flat_ids_S, minlength=self.num_experts)
        device = x_TD.device.type
        # grouped_mm is not covered by autocast, so cast to the autocast dtype ourselves.
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else self.w1_EDF.dtype)
        use_gmm = grouped_mm_supported(device, dtype)
        x_SD = x_TD[token_S].to(dtype)
        h_SF = segment_matmul(x_SD, self.w1_EDF.to(dtype), counts_E, use_gmm)
        h_SF = F.gelu(h_SF + self.b1_EF[sorted_ids_S].to(dtype))
        y_SD = segment_matmul(h_SF, self.w2_EFD.to(dtype), counts_E, use_gmm)
        y_SD = (y_SD + self.b2_ED[sorted_ids_S].to(dtype)) * weights_TK.reshape(-1)[order_S, None]
        return torch.zeros_like(x_TD).index_add_(0, token_S, y_SD.to(x_TD.dtype))


class DenseFFN(nn.Module):
    """A plain GELU FFN: the dense-equivalent baseline, and the shape of one expert on disk."""

    def __init__(self, n_embd: int, hidden: int, n_layer: int = 1):
        super().__init__()
        self.fc1 = nn.Linear(n_embd, hidden)
        self.fc2 = nn.Linear(hidden, n_embd)
        nn.init.normal_(self.fc1.weight, std=0.02)
        nn.init.zeros_(self.fc1.bias)
        nn.init.normal_(self.fc2.weight, std=0.02 / (2 * n_layer) ** 0.5)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


# One expert loaded on its own from model_00J.pt is exactly a DenseFFN.
Expert = DenseFFN
