"""`himoe verify`: check a saved model, or a prepared corpus."""

from __future__ import annotations

import sys
from pathlib import Path


def cmd_verify(args) -> int:
    if args.data_file is not None:
        from himoe.data.shards import PreparedCorpus, is_prepared
        from himoe.errors import UserError

        if not is_prepared(args.data_file):
            raise UserError(f"--data_file {args.data_file} is not a directory `himoe prepare` "
                            "wrote; verify checks prepared corpora (text needs no check)")
        print(PreparedCorpus(Path(args.data_file)).verify())
        if args.model_dir is None:
            return 0
    from himoe.checkpoint.verify import verify

    problems, summary = verify(Path(args.model_dir or "model"))
    for line in problems:
        print(f"himoe: verify: {line}", file=sys.stderr)
    if problems:
        return 2
    print(summary)
    return 0


def add_parser(sub) -> None:
    check = sub.add_parser("verify", help="check a saved model (manifest, sizes, sha256, that "
                                          "every file loads and the model builds) or a "
                                          "prepared corpus (sizes, sha256, token ids)")
    check.add_argument("--model_dir", "--model-dir", default=None,
                       help="the model to check (default: model, unless --data_file is given)")
    check.add_argument("--data_file", "--data-file", default=None, metavar="DIR",
                       help="a directory `himoe prepare` wrote: check every file's size and "
                            "sha256 and that every token id is in its vocabulary")
    check.set_defaults(func=cmd_verify)
