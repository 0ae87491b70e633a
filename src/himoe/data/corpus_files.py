"""Corpus files: what --data_file names (a file, a directory or a glob), each checked
before it is read, and its kind (plain text, JSON lines, Parquet, gzip). Both ways of
reading a corpus, documents (in memory) and formats (records, streamed), start here."""

from __future__ import annotations

import glob
import os
import stat
from importlib import resources
from pathlib import Path

from himoe.errors import UserError

# The most text --data_file may hold, all files together (docs/your_data.md): tokenising
# keeps the text and 8-byte token ids of every character in memory.
MAX_CORPUS_BYTES = 4 << 30
_SPECIAL = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
            (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def default_corpus_path() -> Path:
    """Hamlet, shipped inside the package: the corpus when --data_file is not given."""
    return Path(str(resources.files("himoe.data").joinpath("hamlet.txt")))


def check_corpus_file(path: Path, limit: int | None = MAX_CORPUS_BYTES) -> int:
    """The size in bytes of corpus file `path`, refused unless it is a regular file within
    `limit` (None: `himoe prepare`, which streams): reading a FIFO blocks, /dev/zero never
    ends, a socket cannot be read."""
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
    if limit is not None and st.st_size > limit:
        raise too_large(str(path), st.st_size)
    return st.st_size


def check_corpus_files(spec, paths: list[Path]) -> None:
    """Every file of a corpus checked (regular, size) before any is read, and their total."""
    total = sum(check_corpus_file(p) for p in paths)
    if total > MAX_CORPUS_BYTES:
        raise too_large(f"{spec} ({len(paths)} files)", total)


def too_large(what: str, size: int) -> UserError:
    return UserError(f"corpus {what} has {size:,} bytes, larger than the {MAX_CORPUS_BYTES:,}-"
                     "byte limit (its token ids would need 8 bytes per character in memory); "
                     "train on a part of it")


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_paths(spec: str | Path | None) -> list[Path]:
    """The files --data_file names, in a fixed order."""
    if spec is None:
        return [default_corpus_path()]
    text = str(spec)
    path = Path(text)
    if not path.exists() and glob.has_magic(text):
        # Everything but directories: a FIFO or device among them is refused, not skipped.
        found = sorted(Path(p) for p in glob.glob(text, recursive=True) if not Path(p).is_dir())
        if not found:
            raise UserError(f"--data_file {text} matches no files; check the pattern (quote it "
                            "so the shell does not expand it)")
        return found
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if not p.is_dir() and not _is_hidden(p, path))
        if not found:
            raise UserError(f"--data_file {text} is a directory without text files; put UTF-8 "
                            "text files in it or pass a file")
        return found
    return [path]  # load_corpus explains a missing path


JSON_LINES = (".jsonl", ".json")
PARQUET = ".parquet"
GZIP = ".gz"


def kind_of(path: Path) -> str:
    """"jsonl", "parquet" or "text", by the name without a `.gz` suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == GZIP:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in JSON_LINES:
        return "jsonl"
    return "parquet" if last == PARQUET else "text"


def is_plain_text(path: Path) -> bool:
    """One uncompressed text (not records, not gzip): what load_corpus reads."""
    return kind_of(path) == "text" and path.suffix.lower() != GZIP


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
