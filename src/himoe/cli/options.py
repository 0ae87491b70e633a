"""What every command's parser shares: one-line errors and the common flags, defined once."""

from __future__ import annotations

import argparse

from himoe.config import DEVICES, SEED_MAX


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of usage + message
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def seed_flag(text: str) -> int:
    """argparse type of --seed: an integer every random generator here accepts."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed needs an integer, got {text!r}") from None
    if not 0 <= seed <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"--seed must be between 0 and {SEED_MAX} (2^63 - 1), "
                                         f"got {seed}")
    return seed


def add_model_dir(parser: argparse.ArgumentParser, **kwargs) -> None:
    parser.add_argument("--model_dir", "--model-dir", default="model", **kwargs)


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICES, default="auto")
