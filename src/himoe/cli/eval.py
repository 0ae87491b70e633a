"""`himoe eval`: loss, perplexity and bits per byte of a saved model on any text.

The whole text is read once, in non-overlapping windows of block_size tokens (the documents
of a directory or glob one after another), so the figure is exact rather than sampled:

    loss          = total nats / predicted tokens
    bits per byte = total nats / ln 2 / UTF-8 bytes of the predicted text

Bits per byte does not depend on the tokenizer, so char and BPE models compare on it.
The routing of every token gives the balance figures of himoe.analysis.balance.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from himoe.cli.options import add_device, add_model_dir
from himoe.errors import UserError


def windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """(start, length) of each window: every token but the first is predicted exactly once."""
    return [(start, min(block_size, n_tokens - 1 - start))
            for start in range(0, n_tokens - 1, block_size)]


def evaluate_text(model, tokenizer, corpus, batch_size: int, device, dtype) -> dict:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from himoe.analysis.balance import load_figures
    from himoe.data.documents import encode_documents
    from himoe.training.trainer import autocast

    cfg = model.cfg
    kept = [tokenizer.drop_unknown(t)[0] for t in corpus.texts]
    ids = torch.cat(encode_documents(corpus, tokenizer, drop_unknown=True))
    if len(ids) < 2:
        raise UserError(f"--data_file {corpus.source} has fewer than 2 tokens the model knows; "
                        "pass a longer text")
    spans = windows(len(ids), cfg.block_size)
    counts = {i: torch.zeros(cfg.total_experts, dtype=torch.long) for i in model.moe_layers}
    total_nats, predicted = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad(), tqdm(total=len(spans), desc="eval", unit="window", file=sys.stderr,
                               dynamic_ncols=True, mininterval=0.5) as bar:
        # Full windows go in batches; the last, shorter one (if any) on its own.
        S = cfg.block_size
        full = [start for start, length in spans if length == S]
        batches = [(full[i:i + batch_size], S) for i in range(0, len(full), batch_size)]
        if spans[-1][1] < S:
            batches.append(([spans[-1][0]], spans[-1][1]))
        for starts, length in batches:
            x_BT = torch.stack([ids[s:s + length] for s in starts]).to(device)
            y_BT = torch.stack([ids[s + 1:s + 1 + length] for s in starts]).to(device)
            with autocast(device, dtype):
                logits_BTV, _ = model(x_BT)
            nats = F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten(),
                                   reduction="sum")
            total_nats += float(nats)
            predicted += y_BT.numel()
            for i, layer in model.moe_layers.items():
                counts[i] += torch.bincount(layer.last_ids_TK.reshape(-1).cpu(),
                                            minlength=cfg.total_experts)
            bar.update(len(starts))
    model.train(was_training)
    # The first token is context only: its bytes are not predicted.
    n_bytes = sum(len(t.encode("utf-8")) for t in kept) - \
        len(tokenizer.decode(ids[:1].tolist()).encode("utf-8"))
    loss = total_nats / predicted
    return {"data_file": corpus.source, "documents": len(corpus.texts), "tokens": len(ids),
            "predicted_tokens": predicted, "bytes": n_bytes, "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": total_nats / math.log(2) / max(1, n_bytes),
            "skipped_chars": sum(len(t) for t in corpus.texts) - sum(len(t) for t in kept),
            "layers": [load_figures(counts[i], cfg.num_moes) for i in sorted(counts)]}


def format_report(report: dict) -> str:
    from himoe.cli.table import format_table

    rows = [["loss (nats/token)", f"{report['loss']:.4f}"],
            ["perplexity", f"{report['perplexity']:.2f}"],
            ["bits per byte", f"{report['bits_per_byte']:.4f}"],
            ["tokens", f"{report['tokens']:,}"], ["bytes", f"{report['bytes']:,}"],
            ["documents", str(report["documents"])]]
    for i, fig in enumerate(report["layers"]):
        rows.append([f"layer {i + 1} expert-load CV / MaxVio / dead",
                     f"{fig['expert_cv']:.2f} / {fig['expert_maxvio']:.2f} / "
                     f"{fig['dead_experts']}"])
    return (f"{report['model_dir']} (step {report['step']}, {report['tokenizer']} tokenizer) "
            f"on {report['data_file']}\n" + format_table(["figure", "value"], rows))


def cmd_eval(args) -> int:
    from himoe.checkpoint.card import atomic_write_text, load_model
    from himoe.data.documents import load_documents
    from himoe.data.tokenizers import tokenizer_for
    from himoe.training.trainer import resolve_device

    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.json and Path(args.json).is_dir():
        raise UserError(f"--json {args.json} is a directory; pass a file path")
    if args.lm_eval_task and Path(args.lm_eval_task).is_file():
        raise UserError(f"--lm_eval_task {args.lm_eval_task} is a file; pass a directory")
    corpus = load_documents(args.data_file)  # refuse bad text before loading the model
    model_dir = Path(args.model_dir)
    model, cfg, vocab, step = load_model(model_dir)
    cfg.device = args.device
    device, dtype = resolve_device(cfg)
    tokenizer = tokenizer_for(cfg, vocab, model_dir)
    report = {"model_dir": str(model_dir), "step": step, "tokenizer": cfg.tokenizer} | \
        evaluate_text(model.to(device), tokenizer, corpus, args.batch_size, device, dtype)
    if report["skipped_chars"]:
        print(f"himoe: note: skipped {report['skipped_chars']} characters outside the model's "
              "vocabulary", file=sys.stderr)
    print(format_report(report))
    if args.json:
        atomic_write_text(json.dumps(report, indent=1), Path(args.json))
        print(f"wrote {args.json}")
    if args.lm_eval_task:
        from himoe.eval.lm_eval_task import write_task

        written = write_task(corpus, Path(args.lm_eval_task))
        print(f"wrote the lm-evaluation-harness task {', '.join(str(p) for p in written)}")
        # lm-eval scores each document from a prefix token; himoe's is its blank context.
        task_dir = Path(args.lm_eval_task)
        print(f"score the export (himoe export-hf --model_dir {model_dir} --out HFDIR) with:\n"
              f"  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args "
              f"pretrained=HFDIR,trust_remote_code=True,prefix_token_id="
              f"{tokenizer.blank_token()} --include_path {task_dir} --tasks himoe_text "
              "--device cpu --batch_size 1")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a saved model on "
                                    "a text file, directory or glob")
    add_model_dir(p)
    p.add_argument("--data_file", "--data-file", required=True,
                   help="text to evaluate: a UTF-8 file, a directory or a glob")
    p.add_argument("--batch_size", "--batch-size", type=int, default=16,
                   help="windows per forward pass")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report here")
    p.add_argument("--lm_eval_task", "--lm-eval-task", default=None, metavar="DIR",
                   help="also write a local lm-evaluation-harness perplexity task over the "
                        "same documents into DIR (README: Tokenizers, corpora, evaluation and "
                        "logging)")
    add_device(p)
    p.set_defaults(func=cmd_eval)
