"""The documents of a corpus, one at a time, whatever the files hold (`himoe prepare`).

--data_file names files as for training (a file, a directory or a glob; see
himoe.data.corpus_files.resolve_paths). Each file is read by its name:

- `.jsonl`, `.json`: JSON lines, one document per line, its text under --text_field;
- `.parquet`: one document per row, its text in the --text_field column (needs pyarrow:
  pip install 'himoe[parquet]');
- anything else: a UTF-8 text file, one document;
- a `.gz` suffix on any of them: the same, gzip-compressed.

A bad record (not JSON, a missing field, a non-string, invalid UTF-8, a binary text file)
stops the read with one line naming the file and the line or row, unless skip_bad: then it
is left out and counted in BadRecords.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from himoe.data.corpus_files import (
    GZIP,
    check_corpus_file,
    is_plain_text,
    kind_of,
    resolve_paths,
)
from himoe.data.tokenizers import chunks, iter_chunks
from himoe.errors import UserError

PARQUET_EXTRA = "pip install 'himoe[parquet]'"
_SURROGATE = re.compile("[\ud800-\udfff]")


STREAM_BYTES = 1 << 26  # a text file above this is read piece by piece (read_documents)
READ_BYTES = 1 << 24  # one read of such a file


@dataclass
class Document:
    name: str  # the file, and the line or row within it where a file holds several
    text: str | None  # None: a text file too large to hold, read by pieces() from `path`
    path: Path | None = None

    def pieces(self, size: int) -> Iterator[str]:
        """The text in pieces of about `size` characters, cut only where a cut changes no
        token, so that encoding the pieces gives the text's own ids."""
        if self.text is not None:
            yield from iter_chunks(self.text, size)
            return
        decoder = codecs.getincrementaldecoder("utf-8")()
        carry, done = "", 0  # text not yet cut off; bytes read before this block
        with _open(self.path) as f:
            while block := f.read(READ_BYTES):
                if b"\x00" in block:
                    raise UserError(f"{self.path} looks binary (NUL byte near byte "
                                    f"{done + block.index(0)}); pass UTF-8 text")
                try:
                    text = carry + decoder.decode(block)
                except UnicodeDecodeError as e:
                    raise UserError(f"{self.path} is not valid UTF-8 (near byte {done + e.start}"
                                    f"); convert it, for example with `iconv -t UTF-8 "
                                    f"{self.path}`") from None
                done += len(block)
                *ready, carry = chunks(text, size)  # the last piece may grow: keep it
                yield from ready
            try:
                carry += decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise UserError(f"{self.path} ends inside a UTF-8 character; convert it or cut "
                                "it at a character boundary") from None
        if carry:
            yield carry


@dataclass
class BadRecords:
    """What skip_bad left out: a count and the first few, for the summary line."""

    skip: bool = False
    count: int = 0
    examples: list[str] = field(default_factory=list)
    # The fix to print in place of the record's own and --skip_bad_records, for a command
    # without those flags (training on a JSON lines file).
    instead: str | None = None

    def report(self, where: str, problem: str, fix: str) -> None:
        if self.instead:
            raise UserError(f"{where}: {problem}; fix it, {self.instead}")
        if not self.skip:
            raise UserError(f"{where}: {problem}; {fix}, or pass --skip_bad_records to leave "
                            "such records out")
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(f"{where}: {problem}")


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == GZIP else open(path, "rb")


def read_documents(spec, text_field: str = "text", bad: BadRecords | None = None,
                   stream: bool = False) -> Iterator[Document]:
    """Every document of --data_file SPEC, in a fixed order (files sorted by path). stream:
    a plain text file over STREAM_BYTES is not read here but by its Document's pieces()
    (where a bad byte stops the read: one file is one document, there is nothing to skip)."""
    bad = bad if bad is not None else BadRecords()
    paths = resolve_paths(spec)
    for path in paths:
        check_corpus_file(path, limit=None)  # a FIFO or a device is refused before reading
    for path in paths:
        try:
            kind = kind_of(path)
            if kind == "jsonl":
                yield from _json_lines(path, text_field, bad)
            elif kind == "parquet":
                yield from _parquet(path, text_field, bad)
            elif stream and is_plain_text(path) and path.stat().st_size > STREAM_BYTES:
                yield Document(str(path), None, path)
            else:
                doc = _text_file(path, bad)
                if doc is not None:
                    yield doc
        except (gzip.BadGzipFile, EOFError) as e:
            raise UserError(f"{path} is not a complete gzip file ({e or 'truncated'}); "
                            "compress it again or drop the .gz suffix") from None


def _text_file(path: Path, bad: BadRecords) -> Document | None:
    with _open(path) as f:
        raw = f.read()
    if b"\x00" in raw:
        bad.report(str(path), "looks binary (it holds NUL bytes)", "pass UTF-8 text")
        return None
    try:
        return Document(str(path), raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        bad.report(str(path), f"is not valid UTF-8 (byte {e.start})",
                   f"convert it, for example with `iconv -t UTF-8 {path}`")
        return None


def _json_lines(path: Path, text_field: str, bad: BadRecords) -> Iterator[Document]:
    with _open(path) as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} line {number}"
            # json.loads reads the UTF-8 bytes itself, and the line is dropped as soon as
            # it is parsed: a record of N bytes is held once as bytes, then as its text.
            try:
                record = json.loads(raw) if raw.strip() else None
            except UnicodeDecodeError as e:
                bad.report(where, f"is not valid UTF-8 (byte {e.start})", "convert the file")
                continue
            except json.JSONDecodeError as e:
                bad.report(where, f"is not JSON ({e.msg})", "fix the line")
                continue
            finally:
                del raw
            if record is None:
                continue
            if not isinstance(record, dict) or text_field not in record:
                bad.report(where, f"has no field {text_field!r}",
                           "name the field that holds the text with --text_field")
                continue
            text = record.pop(text_field)
            del record
            if not isinstance(text, str):
                bad.report(where, f"field {text_field!r} is a {type(text).__name__}, not a "
                           "string", "store the text as a JSON string")
                continue
            if _SURROGATE.search(text):  # a lone surrogate escape, e.g. "\ud800": no copy
                bad.report(where, f"field {text_field!r} is not valid Unicode (a lone "
                           "surrogate)", "fix the text")
                continue
            yield Document(where, text)
            del text


def _parquet(path: Path, text_field: str, bad: BadRecords) -> Iterator[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path} is Parquet, which needs pyarrow; {PARQUET_EXTRA}") from None
    if path.suffix.lower() == GZIP:
        with gzip.open(path, "rb") as f:
            source = io.BytesIO(f.read())
    else:
        source = path
    try:
        table = pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a Parquet file pyarrow can read ({e}); check it") \
            from None
    schema = table.schema_arrow
    if text_field not in schema.names:
        raise UserError(f"{path} has no column {text_field!r} (it has "
                        f"{', '.join(schema.names)}); name the text column with --text_field")
    column_type = schema.field(text_field).type
    textual = pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
    binary = pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)
    row = 0
    for batch in table.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            where = f"{path} row {row}"
            row += 1
            if binary and value is not None:
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad.report(where, f"is not valid UTF-8 (byte {e.start})",
                               "store UTF-8 text")
                    continue
            elif not textual:
                bad.report(where, f"column {text_field!r} holds {column_type}, not strings",
                           "name a string column with --text_field")
                continue
            if value is None:
                bad.report(where, f"column {text_field!r} is null", "fill in the text")
                continue
            yield Document(where, value)
