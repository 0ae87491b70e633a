"""Will it fit? Rough lower bounds on the memory a training step or a generation needs,
checked before anything is allocated: an absurd --batch_size or --num_samples gets one line
instead of an out-of-memory kill. The bounds undercount on purpose (no allocator slack,
no attention scores), so they only refuse what cannot fit at all."""

from __future__ import annotations

import torch

from himoe.config import HiMoEConfig, machine_memory
from himoe.errors import UserError


def device_memory(device: torch.device | str) -> int | None:
    """Total bytes of the device's memory (the machine's for the CPU), None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return machine_memory()


def _vocab(cfg: HiMoEConfig) -> int:
    """The vocabulary size, or before the tokenizer exists the BPE target (a char
    vocabulary is small next to the rest)."""
    return cfg.vocab_size or (cfg.bpe_vocab_size if cfg.tokenizer == "bpe" else 0)


def training_bytes(cfg: HiMoEConfig) -> int:
    """fp32 weights, gradients and AdamW's two moments, plus the activations one step keeps
    for the backward pass: per token and layer about 16 * n_embd values around attention
    and 3 * ffn_hidden per chosen expert, and the logits."""
    tokens = cfg.batch_size * cfg.block_size
    per_token = cfg.n_layer * (16 * cfg.n_embd + 3 * cfg.experts_per_token * cfg.ffn_hidden)
    return 4 * (4 * cfg.parameter_estimate() + tokens * (per_token + 3 * _vocab(cfg)))


def generation_bytes(cfg: HiMoEConfig, batch: int, length: int) -> int:
    """The KV cache (keys and values of every layer over the context window), the logits
    the sampler works on and the batch of `length` token ids, for `batch` sequences."""
    cache = 2 * cfg.n_layer * cfg.block_size * cfg.n_embd * 4
    return batch * (cache + 4 * 4 * _vocab(cfg) + 8 * length)


def _check(needed: int, device, what: str, fix: str) -> None:
    have = device_memory(device)
    if have is not None and needed > have:
        raise UserError(f"{what} needs at least {needed / 1e9:,.1f} GB of memory and "
                        f"{torch.device(device).type} has {have / 1e9:,.1f} GB; {fix}")


def check_training_fits(cfg: HiMoEConfig, device) -> None:
    _check(training_bytes(cfg), device,
           f"a training step with --batch_size {cfg.batch_size} and --block_size "
           f"{cfg.block_size} on a model of about {cfg.parameter_estimate():.2e} parameters",
           "use a smaller --batch_size or --block_size, or a smaller model")


def check_generation_fits(cfg: HiMoEConfig, device, num_samples: int, length: int) -> None:
    _check(generation_bytes(cfg, num_samples, length), device,
           f"generating --num_samples {num_samples} of {length} tokens",
           "generate fewer samples at a time")
