"""`himoe verify`: check a saved model."""

from __future__ import annotations

import sys
from pathlib import Path

from himoe.cli.options import add_model_dir


def cmd_verify(args) -> int:
    from himoe.checkpoint.verify import verify

    problems, summary = verify(Path(args.model_dir))
    for line in problems:
        print(f"himoe: verify: {line}", file=sys.stderr)
    if problems:
        return 2
    print(summary)
    return 0


def add_parser(sub) -> None:
    check = sub.add_parser("verify", help="check a saved model: manifest, sizes, sha256, "
                                          "that every file loads and the model builds")
    add_model_dir(check)
    check.set_defaults(func=cmd_verify)

