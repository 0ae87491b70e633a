"""`himoe generate`: sample text from a saved model."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from himoe.cli.options import add_device, add_model_dir, seed_flag
from himoe.config import MAX_NEW_TOKENS
from himoe.errors import UserError


def check_generate_args(args) -> None:
    """Flags that can never work, refused before the model is loaded."""
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {args.num_samples}")
    if not 0 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max_new_tokens must be between 0 and {MAX_NEW_TOKENS:,}, got "
                        f"{args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got "
                        f"{args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top_k must be >= 1 (above the vocabulary size it keeps every "
                        f"token), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")


def cmd_generate(args) -> int:
    import torch

    from himoe.checkpoint.card import load_model
    from himoe.data.tokenizers import show_chars, tokenizer_for
    from himoe.training.memory import check_generation_fits

    check_generate_args(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device "
                        "cpu or auto")
    device = "cuda" if args.device == "cuda" or (args.device == "auto"
                                                 and torch.cuda.is_available()) else "cpu"
    model, cfg, vocab, _ = load_model(Path(args.model_dir), device)
    check_generation_fits(cfg, device, args.num_samples, len(args.prompt) + args.max_new_tokens)
    model.eval()
    tok = tokenizer_for(cfg, vocab, Path(args.model_dir))
    # Characters the model never saw: refused by default (--unknown error), or dropped with
    # a note naming them (--unknown skip). The printed prompt is the one the model got.
    prompt, missing = tok.drop_unknown(args.prompt)
    if missing and args.unknown == "error":
        raise UserError(f"--prompt has characters outside the model's vocabulary: "
                        f"{show_chars(missing)}; remove them, or pass --unknown skip to drop "
                        "them")
    if missing:
        print(f"himoe: dropped prompt characters outside the vocabulary: "
              f"{show_chars(missing)}", file=sys.stderr)
    args.prompt = prompt
    context = tok.encode(args.prompt) if args.prompt else [tok.blank_token()]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    batch = torch.tensor([context] * args.num_samples, device=device)  # one batched run
    out = model.generate(batch, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache,
                         generator=gen)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt + tok.decode(row[len(context):]))
    return 0


def add_parser(sub) -> None:
    gen = sub.add_parser("generate", help="sample text from a saved model")
    add_model_dir(gen)
    gen.add_argument("--prompt", default="", help="text to continue (default: blank context)")
    gen.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=400)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    gen.add_argument("--top_k", "--top-k", type=int, default=None)
    gen.add_argument("--top_p", "--top-p", type=float, default=None)
    gen.add_argument("--num_samples", "--num-samples", type=int, default=1,
                     help="independent samples of the same prompt, generated as one batch")
    gen.add_argument("--seed", type=seed_flag, default=1337)
    add_device(gen)
    gen.add_argument("--no_cache", "--no-cache", action="store_true",
                     help="recompute the context at every step instead of using the KV cache")
    gen.add_argument("--unknown", choices=("error", "skip"), default="error",
                     help="prompt characters outside the vocabulary: error (refuse, listing "
                          "them) or skip (drop them, listing them on stderr)")
    gen.set_defaults(func=cmd_generate)

