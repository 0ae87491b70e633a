"""`himoe prepare`: tokenise a corpus once into memory-mapped shards that train, eval and
analyze read with --data_file DIR (himoe.data.prepare)."""

from __future__ import annotations

import argparse

from himoe.config import TOKENIZERS


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"needs a positive integer, got {value}")
    return value


def cmd_prepare(args) -> int:
    from himoe.data.prepare import prepare, summary

    shard_tokens = {"shard_tokens": args.shard_tokens} if args.shard_tokens else {}
    manifest = prepare(args.data_file, args.tokenizer, args.out, args.vocab_size,
                       args.text_field, args.skip_bad_records, **shard_tokens)
    print(summary(manifest, args.out))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="tokenise a corpus into memory-mapped token shards "
                                       "(train with --data_file DIR)")
    p.add_argument("--data_file", "--data-file", required=True, metavar="SPEC",
                   help="text files, .jsonl/.json lines or .parquet, optionally .gz: a file, "
                        "a directory or a glob")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="char")
    p.add_argument("--vocab_size", "--vocab-size", type=positive, default=2048,
                   help="--tokenizer bpe: target vocabulary size (default: 2048)")
    p.add_argument("--text_field", "--text-field", default="text",
                   help="the JSON field or Parquet column holding the text (default: text)")
    p.add_argument("--out", required=True, metavar="DIR", help="the new directory to write")
    p.add_argument("--skip_bad_records", "--skip-bad-records", action="store_true",
                   help="leave out (and count) records without valid text instead of stopping")
    p.add_argument("--shard_tokens", "--shard-tokens", type=positive, default=None,
                   help="tokens per shard file (default: 2^28)")
    p.set_defaults(func=cmd_prepare)
