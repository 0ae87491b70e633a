"""The `himoe` command line: prepare | train | generate | verify | bench | eval | analyze |
experts | chat | export-hf | upcycle | merge | view, one module each. Building the parser
imports only the standard library and himoe's config, so `himoe --help` starts fast; a
command imports torch when it runs. Bad input exits 2 with one line."""

from __future__ import annotations

import errno
import sys

from himoe.cli import (
    analyze,
    bench,
    chat,
    eval,
    experts,
    export_hf,
    generate,
    merge,
    prepare,
    train,
    upcycle,
    verify,
    view,
)
from himoe.cli.options import Parser
from himoe.errors import UserError

COMMANDS = (prepare, train, generate, verify, bench, experts, analyze, eval, chat, export_hf,
            upcycle, merge, view)


def build_parser() -> Parser:
    parser = Parser(prog="himoe", description="Hierarchical Mixture-of-Experts language models")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def join_negative_values(argv: list[str]) -> list[str]:
    """`--lr -1e-3` -> `--lr=-1e-3`: argparse takes a value that starts with '-' for a flag
    (it only knows plain negatives like -1), so the validation that names the real problem
    would never see it."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-"):
            try:
                float(arg)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={arg}"
                continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = join_negative_values(list(sys.argv[1:] if argv is None else argv))
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.bench_argv = rest
    try:
        return args.func(args)
    except UserError as e:
        print(f"himoe: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment, not a bug: disk full, permissions, I/O errors
        hint = {errno.ENOSPC: "free some disk space", errno.EACCES: "check the permissions",
                errno.EROFS: "pick a writable location"}.get(e.errno, "check the path")
        where = f" ({e.filename})" if e.filename else ""
        print(f"himoe: error: {e.strerror or e}{where}; {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("himoe: interrupted; the last complete save is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
