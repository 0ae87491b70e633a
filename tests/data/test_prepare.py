"""`himoe prepare`: prepared shards give the in-memory path's tokens, batches and losses;
every input format; bad records; an interrupted prepare leaves nothing that looks done."""

import gzip
import io
import json
import sys

import numpy as np
import pytest
import torch

from himoe.data import formats, shards
from himoe.data import prepare as prepare_module
from himoe.data.batches import get_batch
from himoe.data.corpora import new_tokenizer, open_corpus, token_splits
from himoe.data.corpus_files import default_corpus_path
from himoe.data.formats import BadRecords, read_documents
from himoe.data.prepare import prepare
from himoe.data.shards import PreparedCorpus
from himoe.training.trainer import Trainer
from tests.cli.test_bad_input import assert_one_line_error, himoe
from tests.conftest import tiny_config
from tests.data.test_corpora import PLAY, make_docs


def quiet_prepare(spec, out, tokenizer="char", **kw):
    return prepare(spec, tokenizer, out, bpe_vocab_size=300, err=io.StringIO(), **kw)


def stream_small_files(monkeypatch, piece_chars=40):
    """prepare reads every text file piece by piece, in reads of 7 bytes (a UTF-8 character
    can straddle two): how it reads a file too large to hold."""
    monkeypatch.setattr(formats, "STREAM_BYTES", 16)
    monkeypatch.setattr(formats, "READ_BYTES", 7)
    monkeypatch.setattr(prepare_module, "PIECE_CHARS", piece_chars)


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
@pytest.mark.parametrize("layout", ["one file", "directory", "one file, streamed"])
def test_prepared_tokens_and_batches_match_in_memory(tmp_path, tokenizer, layout,
                                                     monkeypatch):
    docs = make_docs(tmp_path, 12)
    spec = docs if layout == "directory" else docs / "play_01.txt"
    if layout.endswith("streamed"):
        stream_small_files(monkeypatch)
    out = tmp_path / "prepared"
    manifest = quiet_prepare(spec, out, tokenizer, shard_tokens=41)  # windows cross shards
    assert len(manifest["shards"]) >= 3 and manifest["dtype"] == "<u2"
    cfg = tiny_config(tokenizer=tokenizer, bpe_vocab_size=300)
    plain, prepared = open_corpus(spec), open_corpus(out)
    assert isinstance(prepared, PreparedCorpus) and prepared.sha256() == plain.sha256()
    tok_plain, tok_prepared = new_tokenizer(cfg, plain), new_tokenizer(cfg, prepared)
    assert tok_prepared.vocab == tok_plain.vocab
    train, val = token_splits(plain, tok_plain, 16)
    train_view, val_view = token_splits(prepared, tok_prepared, 16)
    assert torch.equal(train_view.tensor(), train) and torch.equal(val_view.tensor(), val)
    gen_plain, gen_prepared = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(4):
        for a, b in zip(get_batch(train, 4, 16, gen_plain), get_batch(train_view, 4, 16,
                                                                      gen_prepared)):
            assert torch.equal(a, b) and b.dtype == torch.long
    prepared.verify()  # every shard matches its sha256


@pytest.mark.slow  # seconds of whole training runs
def test_training_on_prepared_hamlet_gives_the_same_losses(tmp_path):
    out = tmp_path / "hamlet"
    hamlet = str(default_corpus_path())
    quiet_prepare(hamlet, out)
    common = dict(max_iters=3, eval_interval=3, sample_tokens=4)
    losses = []
    for name, data in (("plain", hamlet), ("prepared", str(out))):
        cfg = tiny_config(**common, data_file=data, model_dir=str(tmp_path / name))
        losses.append(Trainer(cfg, out=io.StringIO()).train().train_losses)
    assert losses[0] == losses[1]


def test_prepared_bpe_directory_trains_with_its_tokenizer(tmp_path, capsys):
    docs = make_docs(tmp_path, 5)
    out = tmp_path / "prepared"
    code, stdout, _ = himoe(["prepare", "--data_file", docs, "--tokenizer", "bpe",
                             "--vocab_size", "300", "--out", out], capsys)
    assert code == 0 and "prepared" in stdout and (out / "tokenizer.json").is_file()
    code, _, err = himoe(["train", "--data_file", out, "--model_dir", tmp_path / "m",
                          "--n_embd", "16", "--n_layer", "1", "--n_head", "2",
                          "--block_size", "8", "--num_moes", "2", "--num_experts", "2",
                          "--batch_size", "2", "--max_iters", "2", "--eval_interval", "2",
                          "--eval_iters", "1", "--sample_tokens", "4", "--device", "cpu"],
                         capsys)
    assert code == 0, err
    assert (tmp_path / "m" / "tokenizer.json").is_file()  # the run took the BPE tokenizer
    reports = []  # eval streams the prepared shards; the figures are the text files' own
    for data in (out, docs):
        code, _, err = himoe(["eval", "--model_dir", tmp_path / "m", "--data_file", data,
                              "--device", "cpu", "--json", tmp_path / "r.json"], capsys)
        assert code == 0, err
        reports.append(json.loads((tmp_path / "r.json").read_text()))
    for key in ("tokens", "predicted_tokens", "bytes", "loss", "layers"):
        assert reports[0][key] == reports[1][key], key


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_a_streamed_file_prepares_as_a_read_one(tmp_path, tokenizer, monkeypatch):
    text = "Ophélie — ô ciel!\nHam. Ay, madam… 𝄞 it is.\n" * 40
    (tmp_path / "play.txt").write_text(text, encoding="utf-8")
    whole = quiet_prepare(tmp_path / "play.txt", tmp_path / "whole", tokenizer)
    stream_small_files(monkeypatch, piece_chars=30)
    streamed = quiet_prepare(tmp_path / "play.txt", tmp_path / "streamed", tokenizer)
    for key in ("tokens", "bytes", "corpus_sha256", "shards", "offsets", "vocab"):
        assert streamed.get(key) == whole.get(key), key
    if tokenizer == "bpe":
        assert (tmp_path / "streamed" / "tokenizer.json").read_bytes() == \
            (tmp_path / "whole" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("bad, needle", [(b"\xff", "not valid UTF-8 (near byte 30)"),
                                         (b"\x00", "looks binary (NUL byte near byte 30)"),
                                         (b"\xc3", "ends inside a UTF-8 character")])
def test_a_streamed_file_with_bad_bytes_is_one_line(tmp_path, capsys, monkeypatch, bad,
                                                    needle):
    stream_small_files(monkeypatch)
    path = tmp_path / "play.txt"
    path.write_bytes(b"a" * 30 + bad + (b"" if bad == b"\xc3" else b"b" * 30))
    code, _, err = himoe(["prepare", "--data_file", path, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_large_vocabulary_uses_uint32():
    assert shards.token_dtype(1 << 16) == np.dtype("<u2")
    assert shards.token_dtype((1 << 16) + 1) == np.dtype("<u4")


# --- formats ---

def write_jsonl(path, records, field="text", compress=False):
    lines = "".join(json.dumps({field: r}) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(lines) if compress else lines)


def write_records(path, field="text"):
    """Four records as JSON lines (gzipped for .gz), or one text for .txt.gz; their texts."""
    texts = [f"record {i}: {PLAY}" for i in range(4)]
    if ".txt" in path.name:
        path.write_bytes(gzip.compress(texts[0].encode()))
        return texts[:1]
    write_jsonl(path, texts, field, compress=path.name.endswith(".gz"))
    return texts


@pytest.mark.parametrize("name", ["c.jsonl", "c.json", "c.jsonl.gz", "c.txt.gz"])
def test_formats_read_the_same_documents(tmp_path, name):
    path = tmp_path / name
    texts = write_records(path, "body")
    docs = list(read_documents(path, "body"))
    assert [d.text for d in docs] == texts
    out = tmp_path / "prepared"
    manifest = quiet_prepare(path, out, text_field="body")
    assert manifest["documents"] == len(texts)


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.txt.gz"])
def test_training_reads_records_as_prepare_does(tmp_path, name):
    """`himoe train --data_file c.jsonl` (no prepare): one document per record, and the
    corpus's identity is the prepared directory's, so the two paths name the same corpus."""
    path = tmp_path / name
    texts = write_records(path)
    corpus = open_corpus(path)
    assert corpus.texts == texts
    assert corpus.sha256() == quiet_prepare(path, tmp_path / "p")["corpus_sha256"]


def test_training_on_a_bad_record_points_to_prepare(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": PLAY}) + "\n" + json.dumps({"body": "x"}) + "\n")
    code, _, err = himoe(["train", "--data_file", path, "--model_dir", tmp_path / "m"], capsys)
    assert_one_line_error(code, err, "line 2: has no field 'text'")
    assert "himoe prepare" in err and "--text_field" in err


def test_parquet_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [PLAY, "second", None]}), path)
    bad = BadRecords(skip=True)
    assert [d.text for d in read_documents(path, "text", bad)] == [PLAY, "second"]
    assert bad.count == 1 and "row 2" in bad.examples[0]


def test_parquet_without_pyarrow_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "c.parquet"
    path.write_bytes(b"PAR1")
    code, _, err = himoe(["prepare", "--data_file", path, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "pip install 'himoe[parquet]'")


BAD_LINES = {
    "not JSON": (b'{"text": "fine"}\n{oops\n', "line 2", "is not JSON"),
    "missing field": (b'{"text": "fine"}\n{"body": "x"}\n', "line 2", "no field 'text'"),
    "non-string": (b'{"text": "fine"}\n{"text": 7}\n', "line 2", "is a int"),
    "invalid UTF-8": (b'{"text": "fine"}\n{"text": "\xff"}\n', "line 2", "not valid UTF-8"),
    "lone surrogate": (b'{"text": "fine"}\n{"text": "\\ud800"}\n', "line 2", "surrogate"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_record_is_one_line_or_skipped_and_counted(tmp_path, capsys, case):
    data, where, problem = BAD_LINES[case]
    path = tmp_path / "c.jsonl"
    path.write_bytes(data + b'{"text": "more fine text"}\n')
    code, _, err = himoe(["prepare", "--data_file", path, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, f"{path} {where}")
    assert problem in err and not (tmp_path / "o").exists()
    code, stdout, err = himoe(["prepare", "--data_file", path, "--out", tmp_path / "o",
                               "--skip_bad_records"], capsys)
    assert code == 0, err
    assert "1 bad records skipped" in stdout
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["documents"] == 2 and manifest["bad_records_skipped"] == 1


def test_bad_text_file_names_the_file(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9\n")
    code, _, err = himoe(["prepare", "--data_file", path, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, f"{path}: is not valid UTF-8")


# --- atomic output ---

def test_interrupted_prepare_leaves_nothing_that_looks_done(tmp_path, monkeypatch):
    docs = make_docs(tmp_path, 3)
    out = tmp_path / "prepared"

    def crash(self, ids):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.ShardWriter, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        quiet_prepare(docs, out)
    assert not out.exists() and not list(tmp_path.glob(".prepared.tmp-*"))


def test_existing_out_and_damaged_shard_are_refused(tmp_path, capsys):
    docs = make_docs(tmp_path, 3)
    out = tmp_path / "prepared"
    quiet_prepare(docs, out)
    code, _, err = himoe(["prepare", "--data_file", docs, "--out", out], capsys)
    assert_one_line_error(code, err, "already exists")
    with open(out / "shard-00000.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(Exception, match="damaged"):
        open_corpus(out)


def test_a_shard_with_ids_past_the_vocabulary_is_named_and_verify_finds_it(tmp_path, capsys):
    docs = make_docs(tmp_path, 12)
    out = tmp_path / "prepared"
    manifest = quiet_prepare(docs, out, shard_tokens=400)
    code, stdout, err = himoe(["verify", "--data_file", out], capsys)
    assert code == 0 and "every id is in the vocabulary" in stdout, err
    # Bit rot in the second shard: one id far past the vocabulary, the checksum stale.
    name = manifest["shards"][1]["file"]
    ids = np.fromfile(out / name, dtype=manifest["dtype"])
    ids[:] = 60000  # every window over this shard meets it
    ids.tofile(out / name)
    code, _, err = himoe(["verify", "--data_file", out], capsys)
    assert_one_line_error(code, err, f"{name} does not match its checksum")
    code, _, err = himoe(["train", "--data_file", out, "--model_dir", tmp_path / "m",
                          "--n_embd", "16", "--n_head", "2", "--block_size", "16",
                          "--batch_size", "64", "--max_iters", "2", "--device", "cpu"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("himoe:")]
    assert code == 2 and "Traceback" not in err  # below the progress bar, one line
    assert len(errors) == 1 and f"{name} holds token id 60000" in errors[0], err


PEAK_CHILD = """
import json, random, sys
from himoe.data.prepare import prepare
random.seed(0)
words = ["to", "be", "or", "not", "that", "is", "question", "naïve", "café", "'tis"]
text = " ".join(random.choice(words) for _ in range(2_000_000))  # one line, no newline
with open(sys.argv[1] + "/one.jsonl", "w") as f:
    f.write(json.dumps({"text": text}) + "\\n")
del text
def kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
base = kb("VmRSS:")
prepare(sys.argv[1] + "/one.jsonl", sys.argv[2], sys.argv[1] + "/out", bpe_vocab_size=300,
        err=open("/dev/null", "w"))
print(kb("VmHWM:") - base)
"""


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer, fixed_mb", [("char", 0), ("bpe", 250)])
def test_one_long_record_costs_prepare_a_small_multiple_of_itself(tmp_path, tokenizer,
                                                                  fixed_mb):
    """A 12 MB record with no newline: prepare holds it as bytes while parsing, then as
    text, and cuts it into pieces (no copy of the whole); BPE adds its encoding batch. The
    record once cost 20x itself (char) and 160x (bpe, cut nowhere)."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(tmp_path), tokenizer],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    record_kb = (tmp_path / "one.jsonl").stat().st_size / 1024
    assert int(r.stdout.split()[-1]) < 6 * record_kb + fixed_mb * 1024
