"""A prepared corpus on disk (`himoe prepare`) and its token ids, read through memory maps.

The directory holds:

- shard-00000.bin, ...: the token ids of every document in document order, raw
  little-endian uint16 (uint32 where the vocabulary has more than 65,536 tokens);
- offsets.bin: int64, where each document starts in that stream, then the stream's end;
- tokenizer.json for a BPE tokenizer (a char vocabulary is the manifest's "vocab");
- manifest.json: sizes, dtype, the sha256 of every file, the tokenizer and the source. It
  is written last, and the whole directory is renamed into place, so a directory with a
  manifest is complete.

Training reads windows from the maps, so resident memory does not grow with the corpus,
and every process of a torchrun job maps the same files (the page cache holds one copy).
The train/validation split is the in-memory one (himoe.data.batches.split_documents):
whole documents validate, or the last 10% of the tokens of a one-document corpus.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from himoe.data.batches import check_split_sizes, train_tokens
from himoe.data.documents import val_indices
from himoe.errors import UserError

MANIFEST_FILE = "manifest.json"
OFFSETS_FILE = "offsets.bin"
FORMAT = "himoe-prepared"
VERSION = 1


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def is_prepared(spec) -> bool:
    """Whether --data_file names a prepared directory (it has our manifest)."""
    return spec is not None and (Path(spec) / MANIFEST_FILE).is_file()


class ShardWriter:
    """Token ids appended to shards of at most shard_tokens each, hashed as they go."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = Path(directory), dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._hash = None
        self._room = 0

    def write(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        while len(ids):
            if self._room == 0:
                self._next_shard()
            part, ids = ids[: self._room], ids[self._room:]
            data = part.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self.shards[-1]["tokens"] += len(part)
            self._room -= len(part)

    def _next_shard(self) -> None:
        self._finish()
        name = shard_name(len(self.shards))
        self._file = open(self.directory / name, "wb")
        self._hash = hashlib.sha256()
        self._room = self.shard_tokens
        self.shards.append({"file": name, "tokens": 0})

    def _finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self._file = None

    def close(self) -> list[dict]:
        self._finish()
        return self.shards


class TokenView:
    """A sequence of token ids made of ranges [start, end) of the shards' stream, read on
    demand: len() and take() as a 1-D tensor has them, which is all get_batch uses."""

    def __init__(self, shards: list[np.ndarray], ranges: list[tuple[int, int]],
                 vocab_size: int | None = None, names: list[str] | None = None,
                 source: str = ""):
        # vocab_size: ids at or past it (a damaged or tampered shard) stop the read with the
        # shard's name, checked on what each read takes, so the cost follows the batch.
        self.shards, self.vocab_size, self.names, self.source = shards, vocab_size, names, source
        self.shard_starts = np.cumsum([0] + [len(s) for s in shards])[:-1]
        self.range_starts = np.array([start for start, _ in ranges], dtype=np.int64)
        lengths = np.array([end - start for start, end in ranges], dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(lengths)])

    def __len__(self) -> int:
        return int(self.cum[-1])

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The ids at positions `index` (any shape) of this sequence, as int64."""
        pos = index.numpy()
        in_range = np.searchsorted(self.cum, pos, side="right") - 1
        stream = self.range_starts[in_range] + (pos - self.cum[in_range])
        if len(self.shards) == 1:  # most corpora: one shard holds 2^28 tokens
            out = self.shards[0][stream].astype(np.int64)
        else:
            shard = np.searchsorted(self.shard_starts, stream, side="right") - 1
            out = np.empty(pos.shape, dtype=np.int64)
            for s in np.unique(shard):  # a window rarely spans more than one shard
                mask = shard == s
                out[mask] = self.shards[s][stream[mask] - self.shard_starts[s]]
        if self.vocab_size is not None and out.size and int(out.max()) >= self.vocab_size:
            self._bad_id(stream, out)
        return torch.from_numpy(out)

    def _bad_id(self, stream: np.ndarray, out: np.ndarray):
        at = int(stream.reshape(-1)[int(np.argmax(out.reshape(-1) >= self.vocab_size))])
        s = int(np.searchsorted(self.shard_starts, at, side="right") - 1)
        name = self.names[s] if self.names else f"shard {s}"
        raise UserError(f"prepared corpus {self.source}: {name} holds token id "
                        f"{int(out.max())} at position {at - int(self.shard_starts[s])}, past "
                        f"the vocabulary of {self.vocab_size}: the file is damaged; check it "
                        f"with `himoe verify --data_file {self.source}` and run `himoe "
                        "prepare` again")

    def tensor(self) -> torch.Tensor:
        """The whole sequence in memory (for a sequential read of the validation side)."""
        return self.take(torch.arange(len(self)))


class PreparedCorpus:
    """A prepared directory, checked (format, sizes) and mapped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.source = str(self.path)
        dtype = np.dtype(m["dtype"])
        self.shards = [self._map(entry["file"], dtype, entry["tokens"]) for entry in m["shards"]]
        self.offsets = self._map(OFFSETS_FILE, np.dtype("<i8"), m["documents"] + 1)
        self._tokenizer = None  # read on first use, then kept: a run asks for it more than once

    def _map(self, name: str, dtype: np.dtype, count: int) -> np.ndarray:
        path = self.path / name
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        if size != count * dtype.itemsize:
            raise UserError(f"prepared corpus {self.path} is damaged ({name} is missing or has "
                            "the wrong size); run `himoe prepare` again")
        # A plain array over the map: indexing a np.memmap wraps every result in a new
        # memmap, three times the cost of the gather itself for a training batch.
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,)).view(np.ndarray)

    @property
    def label(self) -> str:
        m = self.manifest
        return f"{self.path} (prepared from {m['source']}: {m['documents']:,} documents)"

    def sha256(self) -> str:
        return self.manifest["corpus_sha256"]

    def tokenizer(self):
        """The tokenizer the corpus was prepared with."""
        if self._tokenizer is None:
            from himoe.data.tokenizers import TOKENIZER_FILE, BPETokenizer, CharTokenizer

            if self.manifest["tokenizer"] == "char":
                self._tokenizer = CharTokenizer(self.manifest["vocab"])
            else:
                path = self.path / TOKENIZER_FILE
                self._tokenizer = BPETokenizer.from_json(path.read_text(encoding="utf-8"), path)
        return self._tokenizer

    def _ranges(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(train ranges, validation ranges) of the token stream, adjacent ones merged."""
        offsets = np.asarray(self.offsets)
        n = len(offsets) - 1
        if n == 1:
            cut = int(offsets[0]) + train_tokens(int(offsets[1] - offsets[0]))
            return [(int(offsets[0]), cut)], [(cut, int(offsets[1]))]
        val = np.zeros(n, dtype=bool)
        val[val_indices(n)] = True
        sides: tuple[list, list] = ([], [])
        for i in range(n):  # runs of same-side documents become one range each
            side = sides[int(val[i])]
            start, end = int(offsets[i]), int(offsets[i + 1])
            if side and side[-1][1] == start:
                side[-1] = (side[-1][0], end)
            else:
                side.append((start, end))
        return sides

    def splits(self, block_size: int) -> tuple[TokenView, TokenView]:
        """(train, validation) token sequences, as split_documents splits the same corpus."""
        train, val = (self._view(ranges) for ranges in self._ranges())
        check_split_sizes(self.source, len(train), len(val), block_size)
        return train, val

    def all_tokens(self) -> TokenView:
        """Every document's ids, read from the shards as they are taken, so that evaluating
        a corpus larger than memory streams it."""
        return self._view([(0, int(self.offsets[-1]))])

    def _view(self, ranges: list[tuple[int, int]]) -> TokenView:
        return TokenView(self.shards, ranges, self.vocab_size,
                         [entry["file"] for entry in self.manifest["shards"]], self.source)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer().vocab_size

    def text(self) -> str:
        """The corpus decoded back (for an analysis that reads text, not ids)."""
        return self.tokenizer().decode(self.all_tokens().tensor().tolist())

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a model whose tokenizer is not the one the corpus was prepared with."""
        mine = self.tokenizer()
        if mine.kind != tokenizer.kind or list(mine.vocab) != list(tokenizer.vocab):
            raise UserError(f"prepared corpus {self.path} was tokenised with another tokenizer "
                            f"({mine.kind}, {mine.vocab_size} tokens) than the model's "
                            f"({tokenizer.kind}, {tokenizer.vocab_size}); prepare the corpus "
                            "again, or pass the original text files to --data_file")

    def verify(self) -> str:
        """Every file against its sha256 in the manifest and every shard's ids against the
        vocabulary (slow on a large corpus: it reads everything); returns a summary line.
        The sizes were checked when the files were mapped."""
        for entry in [*self.manifest["shards"], self.manifest["offsets"]]:
            digest = hashlib.sha256()
            with open(self.path / entry["file"], "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            if digest.hexdigest() != entry["sha256"]:
                raise UserError(f"prepared corpus {self.path}: {entry['file']} does not match "
                                "its checksum; run `himoe prepare` again")
        for entry, shard in zip(self.manifest["shards"], self.shards):
            if len(shard) and int(shard.max()) >= self.vocab_size:
                raise UserError(f"prepared corpus {self.path}: {entry['file']} holds token id "
                                f"{int(shard.max())}, past the vocabulary of {self.vocab_size}; "
                                "run `himoe prepare` again")
        return (f"prepared corpus {self.path}: {len(self.shards)} shard(s), "
                f"{int(self.offsets[-1]):,} tokens in {self.manifest['documents']:,} documents; "
                "every file matches its size and sha256, every id is in the vocabulary")


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((Path(path) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}/{MANIFEST_FILE} cannot be read ({e}); run `himoe prepare` "
                        "again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}/{MANIFEST_FILE} is not a himoe prepared corpus; pass the "
                        "directory `himoe prepare --out` wrote")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path} was prepared by another himoe (format version "
                        f"{manifest.get('version')}, this one reads {VERSION}); run "
                        "`himoe prepare` again")
    return manifest
