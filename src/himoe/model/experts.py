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


def _segment_mm(x_SI, w_EIO, offs_E, splits: list[int], use_grouped_mm: bool):
    if use_grouped_mm:
        return F.grouped_mm(x_SI, w_EIO, offs=offs_E)
    y_SO = x_SI.new_empty(x_SI.shape[0], w_EIO.shape[2])
    start = 0
    for e, n in enumerate(splits):
        if n:
            torch.mm(x_SI[start:start + n], w_EIO[e], out=y_SO[start:start + n])
        start += n
    return y_SO


class _SegmentMatmul(torch.autograd.Function):
    """y = x @ w[e] over each expert's rows, with a backward that is fast on CPUs: weight
    gradients are written one expert at a time into one preallocated tensor, about 2.5x
    faster than grouped_mm's own backward there (benchmarks/ has the numbers)."""

    @staticmethod
    def forward(ctx, x_SI, w_EIO, offs_E, splits, use_grouped_mm):
        ctx.save_for_backward(x_SI, w_EIO, offs_E)
        ctx.splits, ctx.use_grouped_mm = splits, use_grouped_mm
        return _segment_mm(x_SI, w_EIO, offs_E, splits, use_grouped_mm)

    @staticmethod
    def backward(ctx, g_SO):
        x_SI, w_EIO, offs_E = ctx.saved_tensors
        g_SO = g_SO.contiguous()
        dx_SI = dw_EIO = None
        if ctx.needs_input_grad[0]:
            dx_SI = _segment_mm(g_SO, w_EIO.transpose(1, 2), offs_E, ctx.splits,
                                ctx.use_grouped_mm)
        if ctx.needs_input_grad[1]:
            dw_EIO = torch.empty_like(w_EIO)
            start = 0
            for e, n in enumerate(ctx.splits):
                if n:
                    torch.mm(x_SI[start:start + n].t(), g_SO[start:start + n], out=dw_EIO[e])
                else:
                    dw_EIO[e].zero_()  # an idle expert gets a zero gradient, not none
                start += n
        return dx_SI, dw_EIO, None, None, None


def segment_matmul(x_SI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor,
                   use_grouped_mm: bool, splits: list[int] | None = None) -> torch.Tensor:
    """Rows of x_SI are sorted by expert; counts_E rows belong to each expert in turn."""
    offs_E = counts_E.cumsum(0).to(torch.int32)
    if use_grouped_mm and x_SI.is_cuda:
        # On GPUs grouped_mm's own backward is the fast one, and needs no host sync.
        y_SO = F.grouped_mm(x_SI, w_EIO, offs=offs_E)
        if y_SO.requires_grad:
            # grouped_mm's backward rejects non-contiguous (e.g. broadcast) gradients.
            y_SO.register_hook(lambda g: g.contiguous())
        return y_SO
    splits = counts_E.tolist() if splits is None else splits
    return _SegmentMatmul.apply(x_SI, w_EIO, offs_E, splits, use_grouped_mm)


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
        """y[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t]). An id of -1 marks an
        assignment dropped by a capacity limit: it adds nothing (the residual carries x)."""
        K = ids_TK.shape[1]
        flat_ids_S = ids_TK.reshape(-1)  # S = T * K assignments
        order_S = flat_ids_S.argsort(stable=True)
        if flat_ids_S.min() < 0:  # -1 sorts first: cut the dropped assignments off
            order_S = order_S[int((flat_ids_S < 0).sum()):]
        sorted_ids_S = flat_ids_S[order_S]
        token_S = order_S // K
        counts_E = torch.bincount(sorted_ids_S, minlength=self.num_experts)
        device = x_TD.device.type
        # grouped_mm is not covered by autocast, so cast to the autocast dtype ourselves.
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else self.w1_EDF.dtype)
        use_gmm = grouped_mm_supported(device, dtype)
        x_SD = x_TD[token_S].to(dtype)
        # Biases added in place: the matmul's backward does not need its output.
        splits = None if x_TD.is_cuda else counts_E.tolist()  # one host read for both
        h_SF = segment_matmul(x_SD, self.w1_EDF.to(dtype), counts_E, use_gmm, splits)
        h_SF = F.gelu(h_SF.add_(self.b1_EF[sorted_ids_S].to(dtype)))
        y_SD = segment_matmul(h_SF, self.w2_EFD.to(dtype), counts_E, use_gmm, splits)
        y_SD = y_SD.add_(self.b2_ED[sorted_ids_S].to(dtype)) * weights_TK.reshape(-1)[order_S, None]
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
