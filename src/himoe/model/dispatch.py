"""Token dispatch: the (token, slot) assignments sorted by expert, and back.

Every assignment t * K + k sits at one place in the expert order, and the dropped ones (id
-1, over a capacity limit) sort first, so the full order is a permutation. Both directions
are then gathers, forward and backward: the input gradient and the combine need no
scatter-add, which on a CPU costs a zero fill plus a serial accumulation, and whose
parallel version on a GPU does not sum in a fixed order.
"""

from __future__ import annotations

import torch


class Dispatch:
    """order_S: kept assignments (flat index t * K + k) sorted by expert, token order kept
    within each expert; counts_E: how many each expert got."""

    def __init__(self, ids_TK: torch.Tensor, n_dropped: int, num_experts: int):
        self.T, self.K = ids_TK.shape
        flat_ids = ids_TK.reshape(-1)
        order_full = flat_ids.argsort(stable=True)  # -1 (dropped) sorts first
        self.n_dropped = n_dropped
        self.order_S = order_full[n_dropped:]
        self.token_S = self.order_S // self.K if self.K > 1 else self.order_S
        self.counts_E = torch.bincount(flat_ids[self.order_S], minlength=num_experts)
        self.inverse = torch.empty_like(order_full)
        self.inverse[order_full] = torch.arange(len(order_full), device=order_full.device)

    def sort(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Each kept assignment's token row, in expert order."""
        return _Sort.apply(x_TD, self)

    def combine(self, y_SD: torch.Tensor, weights_TK: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        """sum_k weights[t, k] * y[t, k] in (token, slot) order, summed over slots in a fixed
        order; dropped slots add nothing."""
        y_TKD = _Unsort.apply(y_SD, self).to(dtype).view(self.T, self.K, -1)
        y_TKD = y_TKD * weights_TK.to(dtype)[:, :, None]
        return y_TKD.squeeze(1) if self.K == 1 else y_TKD.sum(1)

    def unsort(self, y_SD: torch.Tensor) -> torch.Tensor:
        """Rows in expert order -> (token, slot) order; a dropped slot gets a zero row."""
        if self.n_dropped:
            y_SD = torch.cat([y_SD.new_zeros(self.n_dropped, y_SD.shape[1]), y_SD])
        return y_SD.index_select(0, self.inverse)

    def resort(self, g_SkD: torch.Tensor) -> torch.Tensor:
        """(token, slot) order -> expert order, kept assignments only."""
        return g_SkD.index_select(0, self.order_S)


class _Sort(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, plan: Dispatch):
        ctx.plan = plan
        return x_TD.index_select(0, plan.token_S)

    @staticmethod
    def backward(ctx, g_SD):
        plan = ctx.plan
        g_SkD = plan.unsort(g_SD.contiguous())
        return (g_SkD if plan.K == 1 else g_SkD.view(plan.T, plan.K, -1).sum(1)), None


class _Unsort(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_SD, plan: Dispatch):
        ctx.plan = plan
        return plan.unsort(y_SD)

    @staticmethod
    def backward(ctx, g_SkD):
        return ctx.plan.resort(g_SkD.contiguous()), None
