"""Which (group, expert) each token goes to, in every layer."""

from __future__ import annotations

import torch

from himoe.model import HiMoEModel


@torch.no_grad()
def routing_trace(model: HiMoEModel, ids_T: list[int]) -> list[list[dict]]:
    """For each token of ids_T (at most block_size), its choices in every MoE layer:
    [{"layer", "group", "expert", "weight"}], numbered from 1 like the checkpoint files."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    model(torch.tensor([ids_T], device=device))
    M = model.cfg.num_experts
    per_token: list[list[dict]] = [[] for _ in ids_T]
    for layer, moe in model.moe_layers.items():
        ids_TK, weights_TK = moe.last_ids_TK.cpu(), moe.last_weights_TK.cpu()
        for t in range(len(ids_T)):
            for e, w in zip(ids_TK[t].tolist(), weights_TK[t].tolist()):
                per_token[t].append({"layer": layer + 1, "group": e // M + 1,
                                     "expert": e % M + 1, "weight": round(w, 4)})
    model.train(was_training)
    return per_token


def routing_log(model: HiMoEModel, context_ids: list[int], generated_ids: list[int],
                decode, n_tokens: int = 50) -> list[dict]:
    """The card's routing_log.json: the first n generated tokens with their routing.
    Each token is routed as the model sees it: as input, after the context before it."""
    first = generated_ids[:n_tokens]
    ids = context_ids + first
    S = model.cfg.block_size
    trace = []
    for start in range(0, len(ids), S):  # windows of block_size when the log is longer
        trace += routing_trace(model, ids[start:start + S])
    trace = trace[len(context_ids):]
    return [{"index": i, "token": decode([tok]), "token_id": tok, "routing": choices}
            for i, (tok, choices) in enumerate(zip(first, trace))]
