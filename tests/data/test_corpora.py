"""--data_file as a file, directory or glob: the split by document and the token cache."""

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from himoe.data import documents
from himoe.data.batches import split_documents, split_train_val
from himoe.data.corpus_files import resolve_paths
from himoe.data.documents import encode_documents, load_documents
from himoe.data.tokenizers import CharTokenizer, train_tokenizer
from himoe.training.trainer import Trainer
from tests.cli.test_bad_input import himoe
from tests.conftest import tiny_config

PLAY = "First Citizen. Before we proceed any further, hear me speak.\nAll. Speak, speak.\n"


def make_docs(root: Path, n: int) -> Path:
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    for i in range(n):
        where = docs / "sub" if i % 3 == 0 else docs
        (where / f"play_{i:02d}.txt").write_text(f"[doc {i}]\n" + PLAY * (5 + i))
    (docs / ".hidden.txt").write_text("not part of the corpus")
    return docs


def test_directory_and_glob_name_the_same_sorted_files(tmp_path):
    docs = make_docs(tmp_path, 4)
    in_dir = resolve_paths(docs)
    assert [p.name for p in in_dir] == ["play_01.txt", "play_02.txt", "play_00.txt",
                                        "play_03.txt"]  # sorted by path: docs/p.. < docs/sub/
    assert resolve_paths(f"{docs}/**/*.txt") == sorted(in_dir)
    assert resolve_paths(docs / "play_01.txt") == [docs / "play_01.txt"]


@pytest.mark.parametrize("n, expected", [(2, [1]), (3, [2]), (10, [9]), (15, [6, 14]),
                                         (40, [9, 19, 29, 39])])
def test_validation_documents_are_evenly_spaced(n, expected):
    corpus = documents.Corpus("x", [Path(str(i)) for i in range(n)], ["a"] * n)
    assert corpus.val_indices() == expected


def test_split_keeps_whole_documents_apart(tmp_path):
    corpus = load_documents(make_docs(tmp_path, 5))
    tok = train_tokenizer("char", corpus, 0)
    docs = encode_documents(corpus, tok)
    train, val = split_documents(corpus, docs, 8)
    assert corpus.val_indices() == [4]
    assert torch.equal(val, docs[4]) and torch.equal(train, torch.cat(docs[:4]))
    assert "[doc 3]" in tok.decode(val.tolist())  # sorted order: docs/sub/play_03 is last


def test_single_file_keeps_the_contiguous_split(tmp_path):
    (tmp_path / "c.txt").write_text(PLAY * 40)
    corpus = load_documents(tmp_path / "c.txt")
    tok = CharTokenizer.from_text(PLAY)
    ids = torch.tensor(tok.encode(PLAY * 40))
    got = split_documents(corpus, encode_documents(corpus, tok), 16)
    want = split_train_val(ids, 16)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert corpus.sha256() == hashlib.sha256((PLAY * 40).encode()).hexdigest()


def test_token_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "CACHE_MIN_BYTES", 0)
    corpus = load_documents(make_docs(tmp_path, 3))
    tok = train_tokenizer("bpe", corpus, 300)
    first = encode_documents(corpus, tok)
    cached = list((tmp_path / "docs" / documents.CACHE_DIR).glob("tokens-*.npz"))
    assert len(cached) == 1
    monkeypatch.setattr(type(tok), "encode", lambda self, text: pytest.fail("not cached"))
    again = encode_documents(corpus, tok)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not list((tmp_path / "docs" / documents.CACHE_DIR).glob(".*tmp*"))


def test_unwritable_cache_location_falls_back_silently(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(documents, "CACHE_MIN_BYTES", 0)
    (tmp_path / "c.txt").write_text(PLAY * 10)
    (tmp_path / documents.CACHE_DIR).write_text("a file where the cache directory would go")
    corpus = load_documents(tmp_path / "c.txt")
    tok = train_tokenizer("char", corpus, 0)
    ids = encode_documents(corpus, tok)
    assert tok.decode(ids[0].tolist()) == PLAY * 10
    assert "cache" not in capsys.readouterr().err


def test_train_on_a_directory_with_the_dashed_flag(tmp_path, capsys):
    docs = make_docs(tmp_path, 4)
    code, out, err = himoe(["train", "--data-file", docs, "--model-dir", tmp_path / "m",
                            "--n_embd", "16", "--n_head", "2", "--block_size", "16",
                            "--num_moes", "2", "--num_experts", "2", "--batch_size", "2",
                            "--max_iters", "2", "--eval_iters", "1", "--sample_tokens", "4",
                            "--device", "cpu"], capsys)
    assert code == 0, err
    assert "(4 documents, 1 validate)" in out
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["config"]["data_file"] == str(docs)


def test_resume_notes_a_changed_document(tmp_path):
    docs = make_docs(tmp_path, 3)
    cfg = dict(n_embd=16, block_size=16, num_moes=2, num_experts=2, batch_size=2, max_iters=2,
               eval_interval=2, eval_iters=1, sample_tokens=4, data_file=str(docs),
               model_dir=str(tmp_path / "m"))
    Trainer(tiny_config(**cfg), out=io.StringIO()).train()
    (docs / "play_01.txt").write_text(PLAY * 9)
    out = io.StringIO()
    Trainer(tiny_config(**(cfg | {"max_iters": 3})), resume=True, out=out).train()
    assert "the corpus differs" in out.getvalue()


def test_read_only_corpus_directory_gets_no_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "CACHE_MIN_BYTES", 0)
    docs = make_docs(tmp_path, 3)
    docs.chmod(0o555)  # marked read-only (respected even when the tests run as root)
    try:
        corpus = load_documents(docs)
        ids = encode_documents(corpus, train_tokenizer("char", corpus, 0))
    finally:
        docs.chmod(0o755)
    assert len(ids) == 3 and not (docs / documents.CACHE_DIR).exists()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


CORRUPT = {
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: b"\x00not a zip\xff" * 50,
    "empty": lambda data: b"",
    "ids past the vocabulary": lambda data: _npz(ids=np.array([10**6] * 3, dtype=np.int32),
                                                  lengths=np.array([1, 1, 1])),
    "negative ids": lambda data: _npz(ids=np.array([-1, 0, 0], dtype=np.int32),
                                      lengths=np.array([1, 1, 1])),
    "negative lengths": lambda data: _npz(ids=np.array([0, 0, 0], dtype=np.int32),
                                          lengths=np.array([4, -2, 1])),
    "float ids": lambda data: _npz(ids=np.array([0.5, 0, 0]), lengths=np.array([1, 1, 1])),
    "object arrays": lambda data: _npz(ids=np.array([[1], "x"], dtype=object),
                                       lengths=np.array([1, 1])),
}


@pytest.mark.parametrize("damage", list(CORRUPT))
def test_a_corrupt_token_cache_is_rebuilt_with_a_warning(damage, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(documents, "CACHE_MIN_BYTES", 0)
    corpus = load_documents(make_docs(tmp_path, 3))
    tok = train_tokenizer("char", corpus, 0)
    first = encode_documents(corpus, tok)
    (cache,) = (tmp_path / "docs" / documents.CACHE_DIR).glob("tokens-*.npz")
    good = cache.read_bytes()
    cache.write_bytes(CORRUPT[damage](good))
    capsys.readouterr()
    again = encode_documents(corpus, tok)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("himoe:")]  # not the bar
    assert len(lines) == 1 and "token cache" in lines[0] and "rebuilt" in lines[0], err
    assert cache.read_bytes() == good  # written again, whole
    assert not list(cache.parent.glob(".*tmp*"))


def test_training_goes_on_over_a_truncated_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(documents, "CACHE_MIN_BYTES", 0)
    docs = make_docs(tmp_path, 4)
    argv = ["train", "--data_file", docs, "--n_embd", "16", "--n_head", "2", "--block_size",
            "16", "--num_moes", "2", "--num_experts", "2", "--batch_size", "2", "--max_iters",
            "1", "--eval_interval", "1", "--eval_iters", "1", "--sample_tokens", "4",
            "--device", "cpu"]
    assert himoe([*argv, "--model_dir", tmp_path / "a"], capsys)[0] == 0
    (cache,) = (docs / documents.CACHE_DIR).glob("tokens-*.npz")
    cache.write_bytes(cache.read_bytes()[:100])
    code, _, err = himoe([*argv, "--model_dir", tmp_path / "b"], capsys)
    assert code == 0, err
    assert "token cache" in err and "Traceback" not in err
