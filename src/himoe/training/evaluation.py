"""Evaluation during training: the validation loss and every MoE layer's expert load."""

from __future__ import annotations

import math

import torch

from himoe.analysis.balance import collapse_warning, load_figures, max_violation
from himoe.config import ModelConfig, TrainConfig
from himoe.data.batches import get_batch
from himoe.model import HiMoEModel
from himoe.model.routers.registry import router_spec
from himoe.training.device import autocast


@torch.no_grad()
def evaluate(model: HiMoEModel, data: torch.Tensor, settings: TrainConfig, device,
             dtype) -> dict:
    """Mean loss over eval_iters fixed batches (same batches at every evaluation, so the
    curve is not noise), plus per-layer expert-load figures."""
    cfg = model.cfg
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(settings.seed + 1)
    moe = model.moe_layers
    counts = {i: torch.zeros(cfg.total_experts, dtype=torch.long) for i in moe}
    dropped = dict.fromkeys(moe, 0)
    batch_maxvio = {i: [] for i in moe}
    entropy = {i: [] for i in moe}
    losses = []
    for _ in range(settings.eval_iters):
        x, y = get_batch(data, settings.batch_size, cfg.block_size, gen)
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
        for i, layer in moe.items():
            batch_E = torch.bincount(layer.last_ids_TK.reshape(-1).cpu(),
                                     minlength=cfg.total_experts)
            counts[i] += batch_E
            batch_maxvio[i].append(max_violation(batch_E[cfg.real_slots(i)]))
            entropy[i].append(layer.last_entropy)
            dropped[i] += layer.last_dropped
    model.train(was_training)
    val_loss = sum(losses) / len(losses)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
            "layers": [load_figures(counts[i], cfg.num_moes, cfg.group_sizes(i)) | {
                "batch_maxvio": sum(batch_maxvio[i]) / len(batch_maxvio[i]),
                "routing_entropy": sum(entropy[i]) / len(entropy[i]),
                "drop_rate": dropped[i] / max(1, int(counts[i].sum()))} for i in sorted(counts)]}


def balance_hint(cfg: ModelConfig) -> str:
    """What the collapse warning advises: the balancing flags this run leaves off, or, when
    every one is on, turning the strongest up (see docs/routing.md, 'The default routing')."""
    levers = router_spec(cfg.router).balance_levers
    off = [f"--{name} {value:g}" for name, value in levers if getattr(cfg, name) == 0]
    if off:
        return "balance it with " + " ".join(off)
    return ("every balancing flag is on (" +
            ", ".join(f"--{name} {getattr(cfg, name):g}" for name, _ in levers) +
            "); a larger --bias_update_rate evens the load faster")


def flag_collapse(layers: list[dict], cfg: ModelConfig) -> list[str]:
    """Marks each layer's figures with "collapsed" (kept in metrics.jsonl) and returns one
    warning line per collapsed layer, naming the flag that balances this router."""
    hint = balance_hint(cfg)
    warnings = []
    for i, figures in enumerate(layers, start=1):
        warning = collapse_warning(i, figures, hint)
        figures["collapsed"] = warning is not None
        if warning:
            warnings.append(warning)
    return warnings
