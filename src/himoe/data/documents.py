"""Documents: what --data_file names, read and checked, and their token ids.

--data_file is a text file, a directory (every non-hidden file under it, sorted by path) or a
glob (`plays/*.txt`). A one-file corpus keeps the card's contiguous split (first 90% of the
tokens train, last 10% validate). A corpus of several files is split by document: evenly
spaced whole files (about one in ten, in sorted order) go to validation, so no document is
shared between the two sides.

Tokenising a large corpus (>= CACHE_MIN_BYTES) shows a progress bar and caches the token ids
in `.himoe-cache/` beside the corpus, keyed by the files' contents and the tokenizer. A
read-only location simply goes without a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from himoe.data.corpus_files import check_corpus_files, is_plain_text, load_corpus, resolve_paths
from himoe.data.formats import BadRecords, read_documents
from himoe.data.tokenizers import chunks
from himoe.errors import UserError

VAL_EVERY = 10  # about one document in ten validates
CACHE_DIR = ".himoe-cache"
CACHE_MIN_BYTES = 1 << 20  # smaller corpora tokenise in well under a second: no bar, no cache


@dataclass
class Corpus:
    source: str  # what --data_file said (or the shipped Hamlet's path)
    paths: list[Path]
    texts: list[str]

    @property
    def label(self) -> str:
        if len(self.paths) == 1:
            return str(self.paths[0])
        return f"{self.source} ({len(self.paths)} documents, {len(self.val_indices())} validate)"

    def sha256(self) -> str:
        """Identifies the corpus for --resume; a one-file corpus keeps its text's sha256."""
        if len(self.texts) == 1:
            return hashlib.sha256(self.texts[0].encode("utf-8")).hexdigest()
        digest = hashlib.sha256()
        for path, text in zip(self.paths, self.texts):
            digest.update(f"{path.name}\0{_text_sha256(text)}\0".encode())
        return digest.hexdigest()

    def val_indices(self) -> list[int]:
        return val_indices(len(self.texts))

    def tokenizer_texts(self) -> list[str]:
        """The text a new tokenizer is fitted to: the training side only, so validation
        stays unseen (a one-file corpus: its first 90% of characters)."""
        if len(self.texts) == 1:
            text = self.texts[0]
            return [text[: len(text) - len(text) // 10]]
        val = set(self.val_indices())
        return [t for i, t in enumerate(self.texts) if i not in val]


def val_indices(n: int) -> list[int]:
    """The documents of n that validate: evenly spaced, the last one included; deterministic,
    by sorted order (none of a one-document corpus, which splits by tokens)."""
    if n == 1:
        return []
    n_val = max(1, round(n / VAL_EVERY))
    return sorted({(j + 1) * n // n_val - 1 for j in range(n_val)})


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_documents(spec: str | Path | None) -> Corpus:
    """Every document of --data_file, read and checked (empty, binary, not UTF-8)."""
    paths = resolve_paths(spec)
    check_corpus_files(spec, paths)
    source = str(spec) if spec is not None else str(paths[0])
    if all(is_plain_text(p) for p in paths):
        return Corpus(source, paths, [load_corpus(p)[0] for p in paths])
    # JSON lines, Parquet or gzip: read as `himoe prepare` reads them, a document per record,
    # each named as prepare names it so that both paths give the corpus one identity.
    how = (f"or prepare the corpus with `himoe prepare --data_file {spec} --out DIR` (there "
           "--text_field and --skip_bad_records apply) and train on DIR")
    docs = list(read_documents(spec, bad=BadRecords(instead=how)))
    if not docs:
        raise UserError(f"--data_file {spec} holds no documents; put each text in a \"text\" "
                        f"field, {how}")
    return Corpus(source, [Path(d.name) for d in docs], [d.text for d in docs])


# --- tokenising, with a cache ---

def _fingerprint(tok) -> str:
    files = tok.files()
    body = json.dumps(files, sort_keys=True) if files else json.dumps(tok.vocab)
    return f"{tok.kind}\0{body}"


def _cache_path(corpus: Corpus, tok, drop_unknown: bool) -> Path:
    digest = hashlib.sha256(_fingerprint(tok).encode())
    digest.update(f"\0drop={drop_unknown}".encode())
    for text in corpus.texts:
        digest.update(_text_sha256(text).encode())
    parent = Path(os.path.commonpath([p.absolute().parent for p in corpus.paths]))
    return parent / CACHE_DIR / f"tokens-{digest.hexdigest()[:32]}.npz"


def _read_cache(path: Path, n_docs: int, vocab_size: int) -> list[torch.Tensor] | None:
    """The cached token ids, or None: no cache yet, or one that is damaged (truncated, not
    an npz, ids outside the vocabulary), which is then rebuilt with a one-line note."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            ids, lengths = data["ids"], data["lengths"]
        problem = _cache_problem(ids, lengths, n_docs, vocab_size)
    except Exception as e:  # zipfile, zlib, numpy and OS errors alike: the cache is disposable
        problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    if problem is not None:
        print(f"himoe: token cache {path} is damaged ({problem}); it is rebuilt",
              file=sys.stderr, flush=True)
        return None
    parts = np.split(ids, np.cumsum(lengths)[:-1])
    return [torch.from_numpy(part.astype(np.int64)) for part in parts]


def _cache_problem(ids: np.ndarray, lengths: np.ndarray, n_docs: int,
                   vocab_size: int) -> str | None:
    if ids.ndim != 1 or lengths.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or \
            not np.issubdtype(lengths.dtype, np.integer):
        return "arrays of the wrong kind"
    if len(lengths) != n_docs or (lengths < 0).any() or int(lengths.sum()) != len(ids):
        return "document lengths do not match"
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        return "token ids outside the vocabulary"
    return None


def _write_cache(path: Path, docs: list[torch.Tensor]) -> None:
    """Atomic (temporary name, then rename); any failure just means no cache."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # A directory marked read-only is left alone even where the user (root) could write.
        if not path.parent.parent.stat().st_mode & stat.S_IWUSR:
            return
        path.parent.mkdir(exist_ok=True)
        ids = torch.cat(docs).numpy().astype(np.int32)
        with open(tmp, "wb") as f:
            np.savez(f, ids=ids, lengths=np.array([len(d) for d in docs], dtype=np.int64))
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def encode_documents(corpus: Corpus, tok, drop_unknown: bool = False) -> list[torch.Tensor]:
    """Token ids of every document (characters outside a char vocabulary dropped when
    drop_unknown), read from the cache when it has them."""
    total = sum(len(t.encode("utf-8")) for t in corpus.texts)
    large = total >= CACHE_MIN_BYTES
    path = _cache_path(corpus, tok, drop_unknown) if large else None
    if path is not None:
        cached = _read_cache(path, len(corpus.texts), tok.vocab_size)
        if cached is not None:
            return cached
    docs = []
    with tqdm(total=total, desc="tokenise", unit="B", unit_scale=True, disable=not large,
              dynamic_ncols=True, mininterval=0.5) as bar:
        for text in corpus.texts:
            if drop_unknown:
                text, _ = tok.drop_unknown(text)
            ids: list[int] = []
            for piece in chunks(text):
                ids += tok.encode(piece)
                bar.update(len(piece.encode("utf-8")))
            docs.append(torch.tensor(ids, dtype=torch.long))
    if path is not None:
        _write_cache(path, docs)
    return docs


