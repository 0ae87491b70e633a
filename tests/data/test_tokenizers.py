"""--tokenizer bpe: deterministic byte-level BPE saved as tokenizer.json, used by every
command; --tokenizer char stays the card's."""

import io
import json
import shutil
from pathlib import Path

import pytest

from himoe.checkpoint import manifest as mf
from himoe.checkpoint.card import load_tokenizer
from himoe.checkpoint.verify import verify
from himoe.data.documents import Corpus
from himoe.data.tokenizers import (
    TOKENIZER_FILE,
    BPETokenizer,
    CharTokenizer,
    chunks,
    train_tokenizer,
)
from himoe.training.trainer import Trainer
from tests.cli.test_bad_input import assert_one_line_error, himoe
from tests.edit.test_experts import small_config

TEXT = ("Ham. To be, or not to be, that is the question:\nWhether 'tis nobler in the mind "
        "to suffer\nThe slings and arrows of outrageous fortune,\n\n") * 30


def corpus_of(*texts):
    return Corpus("test", [Path(f"d{i}.txt") for i in range(len(texts))], list(texts))


def bpe_config(model_dir, data_file, **overrides):
    return small_config(model_dir, **({"max_iters": 4, "sample_tokens": 12, "tokenizer": "bpe",
                                       "bpe_vocab_size": 300, "data_file": str(data_file)}
                                      | overrides))


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bpe")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    Trainer(bpe_config(root / "model", root / "corpus.txt"), out=io.StringIO()).train()
    return root


def test_bpe_training_is_deterministic_and_round_trips():
    corpus = corpus_of(TEXT)
    one = train_tokenizer("bpe", corpus, 300)
    two = train_tokenizer("bpe", corpus, 300)
    assert one.to_json() == two.to_json()
    assert 257 < one.vocab_size <= 300
    odd = "naïve café — ☃ tabs\there\n\n  spaces  \r\n"
    for text in (TEXT, odd):  # bytes never seen in training still encode
        assert one.decode(one.encode(text)) == text
    assert one.unknown(odd) == [] and one.drop_unknown(odd) == (odd, [])
    assert one.decode([one.blank_token()]) == "\n"
    again = BPETokenizer.from_json(one.to_json(), Path("x"))
    assert again.vocab == one.vocab and again.encode(TEXT) == one.encode(TEXT)


def test_bpe_is_fitted_to_the_training_side_only():
    val_only = "zyzzyva quixotic " * 200
    tok = train_tokenizer("bpe", corpus_of(TEXT, TEXT, val_only), 400)
    assert "zyzzyva" not in "".join(tok.vocab).replace("Ġ", "")  # document 3 validates


def test_char_tokenizer_is_the_cards():
    tok = train_tokenizer("char", corpus_of(TEXT), 2048)
    assert isinstance(tok, CharTokenizer) and tok.chars == sorted(set(TEXT))
    assert tok.files() == {} and tok.vocab == tok.chars


def test_chunked_encoding_equals_whole_text():
    tok = train_tokenizer("bpe", corpus_of(TEXT), 300)
    text = TEXT + "  indented line\n\n\nnext\n \nend"
    pieces = chunks(text, 50)
    assert len(pieces) > 5 and "".join(pieces) == text
    assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text)


def test_bpe_model_saves_tokenizer_in_the_atomic_save(bpe_model):
    model_dir = bpe_model / "model"
    meta = json.loads((model_dir / "config.json").read_text())
    tok = load_tokenizer(model_dir)
    assert meta["config"]["tokenizer"] == "bpe" and meta["config"]["bpe_vocab_size"] == 300
    assert meta["config"]["vocab_size"] == tok.vocab_size == len(meta["vocab"])
    listed = mf.read(model_dir / mf.MANIFEST_FILE)["files"]
    assert TOKENIZER_FILE in listed
    problems, summary = verify(model_dir)
    assert problems == [] and summary.startswith("OK")
    sample = (model_dir / "sample.txt").read_text()
    assert sample == tok.decode(tok.encode(sample))  # decoded by the BPE tokenizer
    log = json.loads((model_dir / "routing_log.json").read_text())
    assert [e["token"] for e in log] == [tok.decode([e["token_id"]]) for e in log]


@pytest.mark.slow  # seconds of whole training runs
def test_bpe_resume_equals_uninterrupted(tmp_path):
    (tmp_path / "c.txt").write_text(TEXT)
    whole = Trainer(bpe_config(tmp_path / "a", tmp_path / "c.txt"), out=io.StringIO()).train()
    Trainer(bpe_config(tmp_path / "b", tmp_path / "c.txt", max_iters=2),
            out=io.StringIO()).train()
    resumed = Trainer(bpe_config(tmp_path / "b", tmp_path / "c.txt"), resume=True,
                      out=io.StringIO()).train()
    assert resumed.train_losses == whole.train_losses[2:]
    assert resumed.evals[-1]["val_loss"] == whole.evals[-1]["val_loss"]
    assert (tmp_path / "a" / TOKENIZER_FILE).read_bytes() == \
        (tmp_path / "b" / TOKENIZER_FILE).read_bytes()


def test_commands_use_the_bpe_tokenizer(bpe_model, tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "model"
    shutil.copytree(bpe_model / "model", model_dir)
    monkeypatch.chdir(bpe_model)
    code, out, err = himoe(["generate", "--model_dir", model_dir, "--prompt", "Ham. é",
                            "--max_new_tokens", "5"], capsys)
    assert code == 0 and out.startswith("Ham. é"), err
    code, out, err = himoe(["experts", "list", "--model_dir", model_dir], capsys)
    assert code == 0 and "layer" in out, err
    code, out, err = himoe(["analyze", "--model_dir", model_dir, "--domain", "a=corpus.txt",
                            "--domain", "b=corpus.txt", "--no_plots", "--out",
                            tmp_path / "an"], capsys)
    assert code == 0, err
    monkeypatch.setattr("sys.stdin", io.StringIO("Ham.\n"))
    code, out, err = himoe(["chat", "--model_dir", model_dir, "--max_new_tokens", "3"], capsys)
    assert code == 0, err
    # quantize writes a new save without being handed the tokenizer: it must keep it
    code, _, err = himoe(["experts", "quantize", "--model_dir", model_dir], capsys)
    assert code == 0, err
    assert (model_dir / TOKENIZER_FILE).read_bytes() == \
        (bpe_model / "model" / TOKENIZER_FILE).read_bytes()
    assert verify(model_dir)[0] == []


def test_broken_or_mismatched_tokenizer_is_one_line(bpe_model, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(bpe_model / "model", model_dir)
    (model_dir / TOKENIZER_FILE).write_text("{not json")
    code, _, err = himoe(["generate", "--model_dir", model_dir, "--max_new_tokens", "2"], capsys)
    assert_one_line_error(code, err, "tokenizers library can")
    other = train_tokenizer("bpe", corpus_of("abc def " * 100), 280)
    (model_dir / TOKENIZER_FILE).write_text(other.to_json())
    code, _, err = himoe(["generate", "--model_dir", model_dir, "--max_new_tokens", "2"], capsys)
    assert_one_line_error(code, err, "does not match the vocabulary")
    assert any("sha256" in p or "does not match" in p for p in verify(model_dir)[0])


@pytest.mark.slow  # seconds of whole training runs
def test_tokenizer_flags_both_spellings_and_resume_guard(bpe_model, tmp_path, capsys):
    small = ["--n_embd", "16", "--n_head", "2", "--block_size", "16", "--num_moes", "2",
             "--num_experts", "2", "--batch_size", "2", "--max_iters", "2", "--eval_iters", "1",
             "--sample_tokens", "4", "--device", "cpu", "--data_file", bpe_model / "corpus.txt"]
    for flags, name in ((["--tokenizer", "bpe", "--vocab_size", "280"], "a"),
                        (["--tokenizer", "bpe", "--vocab-size", "280"], "b"),
                        (["--tokenizer", "bpe", "--bpe-vocab-size", "280"], "c")):
        code, _, err = himoe(["train", *small, *flags, "--model_dir", tmp_path / name], capsys)
        assert code == 0, err
    jsons = {(tmp_path / n / TOKENIZER_FILE).read_text() for n in "abc"}
    assert len(jsons) == 1
    code, _, err = himoe(["train", "--resume", "--max_iters", "3", "--tokenizer", "char",
                          "--model_dir", tmp_path / "a"], capsys)
    assert_one_line_error(code, err, "--tokenizer char differs")
