"""int8 weight-only quantisation of expert files: per output channel, symmetric.

A quantised expert file stores, for each of fc1.weight [F, D] and fc2.weight [D, F],
"NAME_int8" (int8, same shape) and "NAME_scale" (fp32, one per output row) instead of
"NAME"; the biases stay fp32. w = int8 * scale, with scale = max|row| / 127, so every row
keeps its own range. Loading (himoe.checkpoint.card.from_files) dequantises, so a quantised
model works with every command; to load one file into himoe.Expert by hand, pass it
through dequantize_state first.
"""

from __future__ import annotations

import torch

from himoe.errors import UserError

QUANTIZED = ("fc1.weight", "fc2.weight")
INT8, SCALE = "_int8", "_scale"


def quantize_rows(w_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_OI int8, scale_O fp32) with w ~= q * scale[:, None]; an all-zero row gets scale 1."""
    w_OI = w_OI.float()
    amax_O = w_OI.abs().amax(dim=1)
    scale_O = torch.where(amax_O > 0, amax_O / 127.0, torch.ones_like(amax_O))
    q_OI = torch.round(w_OI / scale_O[:, None]).clamp(-127, 127).to(torch.int8)
    return q_OI, scale_O


def is_quantized(sd: dict) -> bool:
    return any(k.endswith(INT8) for k in sd)


def quantize_expert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An expert state_dict with its weight matrices in int8 (already int8 ones unchanged)."""
    out = {}
    for name, value in sd.items():
        if name in QUANTIZED:
            out[name + INT8], out[name + SCALE] = quantize_rows(value)
        else:
            out[name] = value
    return out


def dequantize_state(sd: dict[str, torch.Tensor], name: str = "expert file") -> dict:
    """The plain fp32 state_dict of a (possibly) quantised expert file; others pass through."""
    if not is_quantized(sd):
        return sd
    out = {k: v for k, v in sd.items() if not k.endswith((INT8, SCALE))}
    for key, q_OI in sd.items():
        if not key.endswith(INT8):
            continue
        base = key.removesuffix(INT8)
        scale_O = sd.get(base + SCALE)
        if (q_OI.dtype != torch.int8 or q_OI.dim() != 2 or scale_O is None
                or tuple(scale_O.shape) != (q_OI.shape[0],)):
            raise UserError(f"{name}: {key} needs an int8 matrix and {base}{SCALE} one scale "
                            "per row; re-quantise the expert with `himoe experts quantize`")
        out[base] = q_OI.float() * scale_O.float()[:, None]
    return out
