"""Expert FFNs: one stacked bank per layer, run as a grouped matmul over sorted tokens.

In memory the E experts of a layer are stacked tensors (w1_EDF, w2_EFD), so one grouped
matmul runs them all; on disk each expert is its own file (see himoe.checkpoint.card).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from himoe.model.dispatch import Dispatch
from himoe.model.grad_sink import GradSink


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
        # The CPU path's input gradient: a transposed (strided) weight.
        dx = grouped_mm(y.detach(), w.detach().transpose(1, 2), offs=offs)
        ref = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
        ref_dx = torch.cat([ref[:3] @ w[0].t(), ref[3:] @ w[2].t()])
        return bool(torch.allclose(y.float(), ref.float(), atol=1e-2, rtol=1e-2)
                    and torch.allclose(dx.float(), ref_dx.float(), atol=1e-1, rtol=1e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


Segments = list[tuple[int, slice]]  # (expert, its rows) for each expert that has rows


def segments_of(counts: list[int]) -> Segments:
    """The row range of each expert with rows, in expert order."""
    segments, start = [], 0
    for e, n in enumerate(counts):
        if n:
            segments.append((e, slice(start, start + n)))
        start += n
    return segments


class _SegmentLinear(torch.autograd.Function):
    """y = x @ w[e] + b[e] over each expert's rows: the CPU path.

    The forward and the input gradient go through F.grouped_mm where it runs (offs_E given):
    it spreads the experts over the cores, ~7% faster than one matmul per expert here, and
    gave the same bits. Otherwise one addmm per expert, bias fused as nn.Linear does. The
    weight gradient is always one torch.mm per expert into one preallocated tensor:
    grouped_mm's own weight gradient is ~2.5x slower on a CPU. Bias gradients are
    per-segment row sums. Loops visit only the experts with rows (a few of 48 once card
    routing has collapsed). sink: where given, the weight gradient goes straight into w's
    .grad (see grad_sink)."""

    @staticmethod
    def forward(ctx, x_SI, w_EIO, b_EO, segments: Segments, counts_E, offs_E,
                sink: GradSink | None):
        ctx.save_for_backward(x_SI, w_EIO)
        ctx.segments, ctx.offs_E, ctx.sink = segments, offs_E, sink
        if offs_E is not None:
            y_SO = F.grouped_mm(x_SI, w_EIO, offs=offs_E)
            return y_SO.add_(b_EO.repeat_interleave(counts_E, dim=0, output_size=len(x_SI)))
        y_SO = x_SI.new_empty(x_SI.shape[0], w_EIO.shape[2])
        for e, rows in segments:
            torch.addmm(b_EO[e], x_SI[rows], w_EIO[e], out=y_SO[rows])
        return y_SO

    @staticmethod
    def backward(ctx, g_SO):
        x_SI, w_EIO = ctx.saved_tensors
        g_SO = g_SO.contiguous()
        segments = ctx.segments
        loop_dx = ctx.needs_input_grad[0] and ctx.offs_E is None
        if not ctx.needs_input_grad[0]:
            dx_SI = None
        elif loop_dx:
            dx_SI = x_SI.new_empty(x_SI.shape)
        else:
            dx_SI = F.grouped_mm(g_SO, w_EIO.transpose(1, 2), offs=ctx.offs_E)
        sink = ctx.sink if ctx.needs_input_grad[1] else None
        dw_EIO = None
        if sink is not None:
            sink.begin([e for e, _ in segments])
        elif ctx.needs_input_grad[1]:
            dw_EIO = torch.empty_like(w_EIO)
            for e in sorted(set(range(len(w_EIO))) - {e for e, _ in segments}):
                dw_EIO[e].zero_()  # an idle expert gets a zero gradient, not none
        db_EO = g_SO.new_zeros(w_EIO.shape[0], w_EIO.shape[2]) if ctx.needs_input_grad[2] else None
        for e, rows in segments:
            if loop_dx:
                torch.mm(g_SO[rows], w_EIO[e].t(), out=dx_SI[rows])
            if sink is not None:
                sink.write(e, x_SI[rows].t(), g_SO[rows])
            elif dw_EIO is not None:
                torch.mm(x_SI[rows].t(), g_SO[rows], out=dw_EIO[e])
            if db_EO is not None:
                torch.sum(g_SO[rows], dim=0, out=db_EO[e])
        return dx_SI, dw_EIO, db_EO, None, None, None, None


def segment_linear(x_SI: torch.Tensor, w_EIO: torch.Tensor, b_EO: torch.Tensor,
                   counts_E: torch.Tensor, offs_E: torch.Tensor | None,
                   segments: Segments | None, sink: GradSink | None = None):
    """Rows of x_SI are sorted by expert, counts_E rows for each expert in turn; returns
    x @ w[e] + b[e] for every row. offs_E: the counts' running sum as int32, where grouped_mm
    runs (None: it does not). On a GPU (segments None): grouped_mm and its own backward
    (fast there, and no host sync). On a CPU (segments: segments_of the counts, read on the
    host): _SegmentLinear, with grouped_mm for the forward and the input gradient where
    offs_E is given, the weight gradient written into w's .grad by `sink` where one is."""
    if segments is None:
        y_SO = F.grouped_mm(x_SI, w_EIO, offs=offs_E)
        if y_SO.requires_grad:
            # grouped_mm's backward rejects non-contiguous (e.g. broadcast) gradients.
            y_SO.register_hook(lambda g: g.contiguous())
        return y_SO + b_EO.repeat_interleave(counts_E, dim=0, output_size=x_SI.shape[0])
    return _SegmentLinear.apply(x_SI, w_EIO, b_EO, segments, counts_E, offs_E, sink)


class ExpertBank(nn.Module):
    """E two-layer GELU FFNs (D -> F -> D) with biases, stored stacked."""

    grad_sinks: tuple[GradSink, ...] = ()  # none: autograd accumulates as usual

    def __init__(self, num_experts: int, n_embd: int, hidden: int, n_layer: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, n_embd, hidden))
        self.b1_EF = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden, n_embd))
        self.b2_ED = nn.Parameter(torch.zeros(num_experts, n_embd))
        nn.init.normal_(self.w1_EDF, std=0.02)
        nn.init.normal_(self.w2_EFD, std=0.02 / (2 * n_layer) ** 0.5)

    def write_grads_in_place(self) -> None:
        """Weight gradients go straight into .grad, idle experts' slices left alone (see
        grad_sink): for one process on a CPU, where nothing hooks the parameters. Zero them
        with grad_sink.zero_grads rather than zero_grad, to keep the saving."""
        self.grad_sinks = (GradSink(self.w1_EDF), GradSink(self.w2_EFD))
        for sink in self.grad_sinks:
            sink.param.grad_sink = sink

    # Data-dependent segment sizes: torch.compile fuses the dense parts around this and
    # leaves the dispatch eager (its fake-tensor rule for grouped_mm also wants bf16 only).
    @torch.compiler.disable
    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                n_dropped: int = 0) -> torch.Tensor:
        """y[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t]). n_dropped assignments have
        id -1 (over a capacity limit): they add nothing, the residual carries x. Passing the
        count in, rather than looking for -1 here, keeps dropless runs free of a host sync."""
        plan = Dispatch(ids_TK, n_dropped, self.num_experts)
        y_SD = self.run_experts(plan.sort(x_TD), plan.counts_E)
        return plan.combine(y_SD, weights_TK, x_TD.dtype)

    def compute_dtype(self, device: str) -> torch.dtype:
        # grouped_mm is not covered by autocast, so cast to the autocast dtype ourselves.
        return (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                else self.w1_EDF.dtype)

    def run_experts(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The FFN of each of this bank's experts over its rows of x_SD (sorted by expert,
        counts_E rows each), in the compute dtype."""
        device = x_SD.device.type
        dtype = self.compute_dtype(device)
        # Chosen once per device and dtype: grouped_mm where it runs, else per-expert matmuls.
        use_gmm = grouped_mm_supported(device, dtype)
        # Both matmuls share the offsets and, on a CPU, one host read of the counts.
        offs_E = counts_E.cumsum(0).to(torch.int32) if use_gmm else None
        segments = None if use_gmm and device == "cuda" else segments_of(counts_E.tolist())
        # A sink writes into the parameter's own .grad, so only where no cast comes between.
        sink1, sink2 = (self.grad_sinks if self.grad_sinks and dtype == self.w1_EDF.dtype
                        else (None, None))
        h_SF = segment_linear(x_SD.to(dtype), self.w1_EDF.to(dtype), self.b1_EF.to(dtype),
                              counts_E, offs_E, segments, sink1)
        return segment_linear(F.gelu(h_SF), self.w2_EFD.to(dtype), self.b2_ED.to(dtype),
                              counts_E, offs_E, segments, sink2)


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
