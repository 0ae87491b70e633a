"""What the page shows of one text: its tokens and, per token and layer, where the model's
own forward pass sent it, with the probabilities behind the choice."""

from __future__ import annotations

import torch

from himoe.model import HiMoEModel
from himoe.model.routers.registry import router_spec

RUNNERS_UP = 2  # alternatives shown beside each choice


@torch.no_grad()
def route_text(model: HiMoEModel, tokenizer, text: str) -> dict:
    """{"tokens": [...], "layers": [per token: {...}]} for `text`, read in windows of
    block_size tokens (each window starts a fresh context), all windows in one batch."""
    ids = tokenizer.encode(tokenizer.drop_unknown(text)[0])  # what the model cannot read
    if not ids:
        return {"tokens": [], "layers": []}
    S = model.cfg.block_size
    pad = -len(ids) % S
    windows_WS = torch.tensor(ids + [ids[-1]] * pad).view(-1, S)  # pads are dropped below
    device = next(model.parameters()).device
    inputs = {}
    hooks = [block.ln2.register_forward_hook(
        lambda m, i, o, layer=layer: inputs.__setitem__(layer, o.reshape(-1, o.shape[-1])))
        for layer, block in enumerate(model.blocks) if layer in model.moe_layers]
    model.eval()
    try:
        model(windows_WS.to(device))
    finally:
        for h in hooks:
            h.remove()
    n = len(ids)
    layers = [layer_choices(model, layer, moe, inputs[layer][:n], n)
              for layer, moe in model.moe_layers.items()]
    return {"tokens": [tokenizer.decode([i]) for i in ids], "layers": layers}


def layer_choices(model: HiMoEModel, layer: int, moe, x_TD: torch.Tensor, n: int) -> list:
    """Per token of one layer: the chosen (group, expert) pairs and their combine weights as
    the forward pass chose them; for the hierarchical router also each level's
    probabilities and the runners-up."""
    cfg, M = model.cfg, model.cfg.num_experts
    ids_TK = moe.last_ids_TK[:n].cpu()
    weights_TK = moe.last_weights_TK[:n].float().cpu()
    hierarchical = router_spec(cfg.router).group_routers
    if hierarchical:
        router = moe.router
        p1_TN = torch.softmax(x_TD.float() @ router.main_weight_ND.float().t(), -1).cpu()
        logits2_TNM = torch.einsum("td,nmd->tnm", x_TD.float(),
                                   router.group_weight_NMD.float()).cpu()
        sizes = cfg.group_sizes(layer)
    out = []
    for t in range(n):
        chosen = [(int(e) // M, int(e) % M, float(w))
                  for e, w in zip(ids_TK[t].tolist(), weights_TK[t].tolist()) if e >= 0]
        entry = {"choices": [{"group": g + 1, "expert": j + 1, "weight": round(w, 4)}
                             for g, j, w in chosen]}
        if hierarchical:
            p1 = p1_TN[t]
            g = chosen[0][0]
            p2 = torch.softmax(logits2_TNM[t, g, :sizes[g]], -1)
            picked = {j for gg, j, _ in chosen if gg == g}
            entry["p1"] = round(float(p1[g]), 4)
            entry["p2"] = [round(float(p2[j]), 4) for _, j, _ in chosen]
            others_g = [int(i) for i in p1.argsort(descending=True) if int(i) != g]
            entry["runner_up_groups"] = [{"group": i + 1, "p1": round(float(p1[i]), 4)}
                                         for i in others_g[:RUNNERS_UP]]
            others_j = [int(j) for j in p2.argsort(descending=True) if int(j) not in picked]
            entry["runner_up_experts"] = [{"expert": j + 1, "p2": round(float(p2[j]), 4)}
                                          for j in others_j[:RUNNERS_UP]]
        out.append(entry)
    return out
