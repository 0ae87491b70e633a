"""`himoe prepare`: a corpus tokenised once into memory-mapped shards (himoe.data.shards).

Three streaming passes over the documents (himoe.data.formats), so memory holds one
document and one batch of text at a time, never the corpus:

1. count the documents and bytes, hash them, and collect a char vocabulary's characters;
2. (BPE only) fit the tokenizer to the training documents, as `himoe train` does;
3. tokenise (BPE through `encode_batch`, on every core) and append to the shards.

The tokenizer, the split and hence the training batches are those `himoe train` makes from
the same files in memory. Everything is written into a hidden sibling directory that is
renamed into place at the end: an interrupted prepare leaves no directory that looks done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from himoe.checkpoint.atomic_dir import fsync_dir, is_dead_temp
from himoe.data import shards
from himoe.data.documents import val_indices
from himoe.data.formats import BadRecords, Document, read_documents
from himoe.data.tokenizers import TOKENIZER_FILE, BPETokenizer, CharTokenizer
from himoe.errors import UserError

SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard
PIECE_CHARS = 1 << 16  # a long document is cut into pieces this size, encoded in parallel
BATCH_BYTES = 1 << 22  # text handed to encode_batch at once: bounds memory, feeds the cores


@dataclass
class Survey:
    """What pass 1 learns about the documents."""

    documents: int = 0
    bytes: int = 0
    first_chars: int = 0  # of the first document (a one-document corpus splits by them)
    chars: set | None = None  # char tokenizer only
    corpus_sha256: str = ""


def prepare(spec, tokenizer: str, out, bpe_vocab_size: int = 2048, text_field: str = "text",
            skip_bad: bool = False, shard_tokens: int = SHARD_TOKENS, err=None) -> dict:
    """Prepare --data_file SPEC into directory `out`; returns the manifest."""
    err = err if err is not None else sys.stderr
    out = Path(out)
    if out.exists():
        raise UserError(f"--out {out} already exists; remove it or pick another --out")
    bad = BadRecords(skip=skip_bad)
    survey = _survey(read_documents(spec, text_field, bad, stream=True), tokenizer == "char")
    if survey.documents == 0:
        raise UserError(f"--data_file {spec} holds no documents; check --text_field "
                        f"{text_field!r} and the files")
    quiet = BadRecords(skip=True)  # later passes meet the same bad records again

    def documents() -> Iterator[Document]:
        return read_documents(spec, text_field, quiet, stream=True)

    if tokenizer == "char":
        tok = CharTokenizer(sorted(survey.chars))
    else:
        tok = BPETokenizer.train(_training_texts(documents(), survey), bpe_vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        manifest = _write(tmp, documents(), tok, survey, shard_tokens, err)
        manifest.update(source=str(spec), text_field=text_field,
                        bad_records_skipped=bad.count, bad_record_examples=bad.examples)
        _write_file(tmp / shards.MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
        fsync_dir(tmp)
        os.rename(tmp, out)  # the commit point
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _remove_dead_temps(out: Path) -> None:
    """Leftovers of a prepare into the same --out that was killed."""
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        if is_dead_temp(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _survey(docs: Iterator[Document], collect_chars: bool) -> Survey:
    survey = Survey(chars=set() if collect_chars else None)
    multi, first = hashlib.sha256(), None
    for doc in docs:
        doc_hash, n_chars = hashlib.sha256(), 0
        for piece in doc.pieces(PIECE_CHARS):
            data = piece.encode("utf-8")
            doc_hash.update(data)
            survey.bytes += len(data)
            n_chars += len(piece)
            if collect_chars:
                survey.chars.update(piece)
        digest = doc_hash.hexdigest()
        # The in-memory corpus's identity (documents.Corpus.sha256), so both agree.
        multi.update(f"{Path(doc.name).name}\0{digest}\0".encode())
        if first is None:
            first, survey.first_chars = digest, n_chars
        survey.documents += 1
    survey.corpus_sha256 = first if survey.documents == 1 else multi.hexdigest()
    return survey


def _training_texts(docs: Iterator[Document], survey: Survey) -> Iterator[str]:
    """The text a BPE tokenizer is fitted to: Corpus.tokenizer_texts, streamed."""
    n = survey.documents
    val = set(val_indices(n))
    for i, doc in enumerate(docs):
        if n == 1:  # its first 90% of characters
            left = survey.first_chars - survey.first_chars // 10
            for piece in doc.pieces(PIECE_CHARS):
                if left <= 0:
                    break
                yield piece[:left]
                left -= len(piece)
        elif i not in val:
            yield from doc.pieces(PIECE_CHARS)


def _write(tmp: Path, docs: Iterator[Document], tok, survey: Survey, shard_tokens: int,
           err) -> dict:
    dtype = shards.token_dtype(tok.vocab_size)
    writer = shards.ShardWriter(tmp, dtype, shard_tokens)
    lengths = np.zeros(survey.documents, dtype=np.int64)
    start = time.perf_counter()
    with tqdm(total=survey.bytes, desc="prepare", unit="B", unit_scale=True, file=err,
              dynamic_ncols=True, mininterval=0.5) as bar:
        encode = _encode_char if tok.kind == "char" else _encode_bpe
        for i, ids, n_bytes in encode(tok, docs):
            writer.write(ids)
            lengths[i] += len(ids)
            bar.update(n_bytes)
    elapsed = time.perf_counter() - start
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
    _write_file(tmp / shards.OFFSETS_FILE, offsets.tobytes())
    manifest = {"format": shards.FORMAT, "version": shards.VERSION, "tokenizer": tok.kind,
                "vocab_size": tok.vocab_size, "dtype": dtype.str,
                "documents": survey.documents, "tokens": int(offsets[-1]),
                "bytes": survey.bytes, "corpus_sha256": survey.corpus_sha256,
                "mb_per_s": round(survey.bytes / 1e6 / max(elapsed, 1e-9), 2),
                "shards": writer.close(),
                "offsets": {"file": shards.OFFSETS_FILE,
                            "sha256": hashlib.sha256(offsets.tobytes()).hexdigest()}}
    if tok.kind == "char":
        manifest["vocab"] = tok.vocab
    else:
        _write_file(tmp / TOKENIZER_FILE, tok.to_json().encode("utf-8"))
    return manifest


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _encode_char(tok: CharTokenizer, docs: Iterator[Document]):
    """(document index, ids, bytes) per document: code points looked up in one numpy step."""
    points = np.array([ord(c) for c in tok.vocab], dtype=np.int64)
    order = np.argsort(points)
    sorted_points, ids_by_order = points[order], order.astype(np.int64)
    for i, doc in enumerate(docs):
        for piece in doc.pieces(PIECE_CHARS):
            text_points = np.frombuffer(piece.encode("utf-32-le"), dtype="<u4")
            yield i, ids_by_order[np.searchsorted(sorted_points, text_points)], \
                len(piece.encode("utf-8"))


def _encode_bpe(tok: BPETokenizer, docs: Iterator[Document]):
    """(document index, ids, bytes) per piece: pieces of many documents go to encode_batch
    together, in order, cut only where the cut changes no token (tokenizers.chunks)."""
    batch: list[tuple[int, str]] = []
    size = 0
    for i, doc in enumerate(docs):
        for piece in doc.pieces(PIECE_CHARS):
            batch.append((i, piece))
            size += len(piece)
            if size >= BATCH_BYTES:
                yield from _encode_batch(tok, batch)
                batch, size = [], 0
    yield from _encode_batch(tok, batch)


def _encode_batch(tok: BPETokenizer, batch: list[tuple[int, str]]):
    if not batch:
        return
    encodings = tok.tok.encode_batch([piece for _, piece in batch])
    for (i, piece), enc in zip(batch, encodings):
        ids = enc.ids
        yield i, np.fromiter(ids, dtype=np.int64, count=len(ids)), len(piece.encode("utf-8"))


def summary(manifest: dict, out: Path) -> str:
    """The line `himoe prepare` prints at the end."""
    m = manifest
    skipped = (f"; {m['bad_records_skipped']:,} bad records skipped (first: "
               f"{m['bad_record_examples'][0]})" if m["bad_records_skipped"] else "")
    return (f"prepared {out}: {m['documents']:,} documents, {m['tokens']:,} tokens "
            f"({m['tokenizer']}, vocabulary {m['vocab_size']:,}, {np.dtype(m['dtype']).name}) "
            f"in {len(m['shards'])} shards, {m['bytes'] / 1e6:,.1f} MB at "
            f"{m['mb_per_s']:,.1f} MB/s{skipped}")

