"""Corpus loading, the character-level tokenizer and the contiguous train/validation split."""

from __future__ import annotations

import os
import stat
from importlib import resources
from pathlib import Path

import torch

from himoe.errors import UserError

# The most text --data_file may hold, all files together (README: Corpora): tokenising
# keeps the text and 8-byte token ids of every character in memory.
MAX_CORPUS_BYTES = 4 << 30
_SPECIAL = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
            (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def default_corpus_path() -> Path:
    """Hamlet, shipped inside the package: the corpus when --data_file is not given."""
    return Path(str(resources.files("himoe.data").joinpath("hamlet.txt")))


def check_corpus_file(path: Path) -> int:
    """The size in bytes of corpus file `path`, refused unless it is a regular file within
    MAX_CORPUS_BYTES: reading a FIFO blocks, /dev/zero never ends, a socket cannot be read."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"corpus {path} does not exist; pass an existing text file to "
                        "--data_file") from None
    except OSError as e:
        raise UserError(f"cannot read corpus {path} ({e.strerror}); check its permissions") \
            from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"corpus {path} is a directory; pass one UTF-8 text file to --data_file")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _SPECIAL if test(st.st_mode)), "special file")
        raise UserError(f"corpus {path} is not a regular file (it is a {kind}); --data_file "
                        "needs a regular UTF-8 text file, a directory or a glob of them")
    if st.st_size > MAX_CORPUS_BYTES:
        raise too_large(str(path), st.st_size)
    return st.st_size


def too_large(what: str, size: int) -> UserError:
    return UserError(f"corpus {what} has {size:,} bytes, larger than the {MAX_CORPUS_BYTES:,}-"
                     "byte limit (its token ids would need 8 bytes per character in memory); "
                     "train on a part of it")


def load_corpus(path: str | Path | None) -> tuple[str, Path]:
    path = Path(path) if path is not None else default_corpus_path()
    check_corpus_file(path)
    try:
        # Non-blocking: a FIFO swapped in after the check cannot hang the open, and the read
        # stops past the limit (a /proc file reports size 0 and /dev/zero never ends).
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            raw = f.read(MAX_CORPUS_BYTES + 1)
    except OSError as e:
        raise UserError(f"cannot read corpus {path} ({e.strerror}); check its permissions") \
            from None
    if len(raw) > MAX_CORPUS_BYTES:
        raise too_large(str(path), len(raw))
    if not raw.strip():
        raise UserError(f"corpus {path} is empty; pass a text file with some text in it")
    if b"\x00" in raw:
        raise UserError(f"corpus {path} looks binary (it holds NUL bytes); pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"corpus {path} is not valid UTF-8 (byte {e.start}); convert it, for "
                        f"example with `iconv -t UTF-8 {path}`") from None
    return text, path


class CharTokenizer:
    """One token per character; the vocabulary is saved in config.json."""

    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def vocab(self) -> list[str]:
        return self.chars

    def files(self) -> dict[str, str]:
        return {}  # the vocabulary is config.json's "vocab"

    def unknown(self, text: str) -> list[str]:
        return sorted({c for c in text if c not in self.index})

    def drop_unknown(self, text: str) -> tuple[str, list[str]]:
        """(text without the characters outside the vocabulary, those characters)."""
        missing = self.unknown(text)
        gone = set(missing)
        return "".join(c for c in text if c not in gone), missing

    def encode(self, text: str) -> list[int]:
        missing = self.unknown(text)
        if missing:
            raise UserError(f"text has characters outside the model's vocabulary: "
                            f"{show_chars(missing)}; remove them or train on a corpus that has "
                            "them")
        return [self.index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def blank_token(self) -> int:
        """The card's 'blank context': a newline where the vocabulary has one."""
        return self.index.get("\n", 0)


def show_chars(chars: list[str], limit: int = 20) -> str:
    """Characters as a readable list: repr makes tabs, odd spaces and controls visible."""
    shown = ", ".join(repr(c) for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


def split_train_val(ids: torch.Tensor, block_size: int, val_fraction: float = 0.1):
    """First 90% for training, last 10% for validation: contiguous, so no text leaks."""
    n_val = int(len(ids) * val_fraction)
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
    need = block_size + 1
    if len(train) < need or len(val) < need:
        raise UserError(f"corpus of {len(ids)} tokens is too short for --block_size {block_size}: "
                        f"each of the 90/10 splits needs at least {need} tokens; use a longer "
                        f"corpus (about {10 * need} characters) or a smaller --block_size")
    return train, val


def get_batch(data: torch.Tensor, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of block_size + 1 tokens; the generator's state is the data position."""
    ix_B = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets_T = torch.arange(block_size + 1)
    window_BT = data[ix_B.unsqueeze(1) + offsets_T]
    return window_BT[:, :-1], window_BT[:, 1:]
