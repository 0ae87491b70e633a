"""`himoe eval`: loss, perplexity and bits per byte of a saved model on a text file,
directory or glob (the figures: himoe.eval.perplexity)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from himoe.cli.options import add_device, add_model_dir
from himoe.errors import UserError


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
    from himoe.data.corpora import open_corpus
    from himoe.data.tokenizers import tokenizer_for
    from himoe.eval.perplexity import evaluate_text
    from himoe.training.device import resolve_device

    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.json and Path(args.json).is_dir():
        raise UserError(f"--json {args.json} is a directory; pass a file path")
    if args.lm_eval_task and Path(args.lm_eval_task).is_file():
        raise UserError(f"--lm_eval_task {args.lm_eval_task} is a file; pass a directory")
    corpus = open_corpus(args.data_file)  # refuse bad text before loading the model
    if args.lm_eval_task and not hasattr(corpus, "texts"):
        raise UserError(f"--lm_eval_task writes the documents' text; --data_file "
                        f"{args.data_file} is a prepared directory, pass its text files")
    model_dir = Path(args.model_dir)
    model, cfg, vocab, step = load_model(model_dir)
    # The saved run's dtype on the device asked for now.
    device, dtype = resolve_device(dataclasses.replace(cfg.run, device=args.device))
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
                   help="text to evaluate: a UTF-8 file, a directory or a glob, or a "
                        "directory `himoe prepare` wrote with the model's tokenizer")
    p.add_argument("--batch_size", "--batch-size", type=int, default=16,
                   help="windows per forward pass")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report here")
    p.add_argument("--lm_eval_task", "--lm-eval-task", default=None, metavar="DIR",
                   help="also write a local lm-evaluation-harness perplexity task over the "
                        "same documents into DIR (docs/your_data.md)")
    add_device(p)
    p.set_defaults(func=cmd_eval)
