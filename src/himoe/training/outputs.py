"""What a run states and writes beside its checkpoints: the routing schedule it starts
with, and the sample and routing log it ends with."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from himoe.analysis.routing_log import routing_log
from himoe.checkpoint import card as checkpoint
from himoe.config import HiMoEConfig
from himoe.model import HiMoEModel
from himoe.model.routers.registry import router_spec


def routing_schedule(cfg: HiMoEConfig) -> str:
    """Which balancing acts when, in the Hi-MoE paper's two stages: stage 1 at routing time
    (selection-side corrections), stage 2 in the loss (R_intra ramped in last)."""
    stage1 = list(router_spec(cfg.router).selection(cfg))
    if cfg.bias_update_rate:
        stage1.append(f"loss-free selection bias (u {cfg.bias_update_rate})")
    if cfg.capacity_factor:
        stage1.append(f"capacity factor {cfg.capacity_factor}")
    stage2 = [f"{name} {coef}" for name, coef in (("Switch", cfg.switch_coef),
              ("z-loss", cfg.z_coef), ("R_inter", cfg.inter_coef)) if coef]
    if cfg.intra_coef:
        ramp = f", ramped in over steps 0-{cfg.intra_warmup}" if cfg.intra_warmup else ""
        stage2.append(f"R_intra {cfg.intra_coef}{ramp}")
    if not stage1 and not stage2:
        return ""
    target = ""
    if cfg.group_shares and (cfg.bias_update_rate or cfg.switch_coef):
        total = sum(cfg.group_shares)
        target = ("\nlevel-1 balance aims at group shares " +
                  " / ".join(f"{x / total:.0%}" for x in cfg.group_shares))
    return (f"routing stage 1 (selection): {'; '.join(stage1) or 'none'}\n"
            f"routing stage 2 (loss, {cfg.reg_form} form): {'; '.join(stage2) or 'none'}"
            f"{target}")


def write_sample(model: HiMoEModel, tokenizer, cfg: HiMoEConfig,
                 model_dir: Path, device, write: bool = True) -> tuple[str, list | None]:
    """sample.txt: sample_tokens tokens from a blank context; routing_log.json: the routing
    of the first 50 of them."""
    model.eval()
    context = [tokenizer.blank_token()]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(torch.tensor([context], device=device), cfg.sample_tokens,
                         generator=gen)
    generated = out[0, len(context):].tolist()
    text = tokenizer.decode(generated)
    if write:
        checkpoint.atomic_write_text(text, model_dir / "sample.txt")
    log = None
    if model.moe_layers:
        log = routing_log(model, context, generated, tokenizer.decode)
        if write:
            checkpoint.atomic_write_text(json.dumps(log, indent=1),
                                         model_dir / "routing_log.json")
    return text, log
