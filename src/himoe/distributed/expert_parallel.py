"""Expert parallelism: each rank holds a contiguous block of every MoE layer's experts
(flat ids rank * E/W ... (rank + 1) * E/W - 1, so whole groups when num_moes % W == 0) and
tokens travel to the rank of their expert and back with all_to_all_single.

Everything else (embeddings, attention, routers) is replicated, and every rank routes its
own slice of the batch. Expert gradients come back through the all-to-all's backward: the
gradient of an expert on its rank already sums the contributions of every rank's tokens.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_to_all_single

from himoe.distributed.collectives import gather_rows
from himoe.model import HiMoEModel
from himoe.model.dispatch import Dispatch
from himoe.model.experts import ExpertBank

# torch >= 2.6 marks this autograd all-to-all as deprecated in favour of a private module;
# it is the public, differentiable one, so it is used here and its warning silenced.
warnings.filterwarnings("ignore", message=r".*all_to_all_single is deprecated",
                        category=FutureWarning)

BANK_PARAMS = ("w1_EDF", "b1_EF", "w2_EFD", "b2_ED")


class ExpertParallelBank(ExpertBank):
    """This rank's experts of one layer. The tensors keep ExpertBank's names, but their
    first dimension is the local count E/W; num_experts stays the layer's total E."""

    def __init__(self, bank: ExpertBank, rank: int, world: int):
        nn.Module.__init__(self)
        self.num_experts, self.rank, self.world = bank.num_experts, rank, world
        self.num_local = bank.num_experts // world
        rows = slice(rank * self.num_local, (rank + 1) * self.num_local)
        for name in BANK_PARAMS:
            setattr(self, name, nn.Parameter(getattr(bank, name).detach()[rows].clone()))

    @torch.compiler.disable
    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                n_dropped: int = 0) -> torch.Tensor:
        W, L = self.world, self.num_local
        plan = Dispatch(ids_TK, n_dropped, self.num_experts)
        counts_E = plan.counts_E
        # Counts first: recv_counts_WL[r, e] = rows rank r sends to our local expert e.
        recv_counts_WL = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts_WL, counts_E)
        recv_counts_WL = recv_counts_WL.view(W, L)
        send_splits = counts_E.view(W, L).sum(1).tolist()  # sorted by expert = by rank
        recv_splits = recv_counts_WL.sum(1).tolist()
        dtype = self.compute_dtype(x_TD.device.type)  # send in the compute dtype
        x_SD = plan.sort(x_TD).to(dtype)
        x_RD = all_to_all_single(x_SD.new_empty(sum(recv_splits), x_SD.shape[1]), x_SD,
                                 recv_splits, send_splits)
        # Rows arrive rank by rank, each sorted by expert; regroup them expert by expert.
        # Stable, so an expert sees rank 0's rows first, then rank 1's: the batch's order.
        local_R = torch.arange(L, device=x_TD.device).repeat(W).repeat_interleave(
            recv_counts_WL.reshape(-1), output_size=x_RD.shape[0])
        by_expert_R = local_R.argsort(stable=True)
        y_RD = self.run_experts(x_RD[by_expert_R], recv_counts_WL.sum(0))
        y_RD = y_RD[by_expert_R.argsort()]  # back to arrival order
        y_SD = all_to_all_single(y_RD.new_empty(len(plan.order_S), y_RD.shape[1]), y_RD,
                                 send_splits, recv_splits)
        return plan.combine(y_SD, weights_TK, x_TD.dtype)


def shard_experts(model: HiMoEModel, rank: int, world: int) -> None:
    """Replace every layer's ExpertBank by this rank's block of it (in place)."""
    for moe in model.moe_layers.values():
        moe.experts = ExpertParallelBank(moe.experts, rank, world)


def expert_parameters(model: HiMoEModel) -> list[nn.Parameter]:
    return [p for moe in model.moe_layers.values() for p in moe.experts.parameters()]


def full_model_state(model: HiMoEModel) -> dict | None:
    """The state_dict of the whole model on rank 0 (experts gathered from every rank, on
    the CPU); None on the other ranks. Collective: every rank calls it."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for layer, moe in model.moe_layers.items():
        for name in BANK_PARAMS:
            state[f"blocks.{layer}.ffn.experts.{name}"] = gather_rows(getattr(moe.experts, name))
    return state if dist.get_rank() == 0 else None


def local_rows(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    rows = full.shape[0] // world
    return full[rank * rows:(rank + 1) * rows].clone()
