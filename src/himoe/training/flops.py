"""Model FLOPs utilisation on active parameters, for GPU runs."""

from __future__ import annotations

import torch

from himoe.config import HiMoEConfig

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
             "RTX 4090": 165e12}


def flops_per_token(cfg: HiMoEConfig, active_params: int) -> float:
    """Training FLOPs per token: 6 per active parameter (forward + backward) plus attention
    scores and values, 12 * n_layer * n_embd * block_size (the PaLM appendix formula)."""
    return 6 * active_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def mfu(cfg: HiMoEConfig, active_params: int, tokens_per_s: float, peak: float | None):
    return None if not peak else flops_per_token(cfg, active_params) * tokens_per_s / peak
