"""`himoe eval`: exact loss, perplexity and bits per byte over the whole text."""

import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from himoe.checkpoint.card import load_model, load_tokenizer
from himoe.data.documents import Corpus, load_documents
from himoe.eval.lm_eval_task import TASK_NAME
from himoe.eval.perplexity import evaluate_text, windows
from himoe.training.trainer import Trainer
from tests.cli.test_bad_input import assert_one_line_error, himoe
from tests.conftest import tiny_config

TRAIN = "the quick brown fox jumps over the lazy dog; café au lait.\n" * 40
HELD_OUT = "a lazy fox; a quick dog. the café is over the brown jumps.\n" * 3


def train(root: Path, name: str, **overrides) -> Path:
    (root / "train.txt").write_text(TRAIN, encoding="utf-8")
    cfg = tiny_config(n_embd=16, block_size=16, num_moes=2, num_experts=2, batch_size=2,
                      max_iters=4, eval_interval=4, eval_iters=1, sample_tokens=4,
                      data_file=str(root / "train.txt"), model_dir=str(root / name),
                      **overrides)
    Trainer(cfg, out=io.StringIO()).train()
    return root / name


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    train(root, "char")
    train(root, "bpe", tokenizer="bpe", bpe_vocab_size=290)
    (root / "held_out.txt").write_text(HELD_OUT, encoding="utf-8")
    return root


def report_for(model_dir: Path, text: str, batch_size: int = 3) -> dict:
    model, _, _, _ = load_model(model_dir)
    return evaluate_text(model, load_tokenizer(model_dir), Corpus("t", [Path("t")], [text]),
                         batch_size, torch.device("cpu"), torch.float32)


def test_windows_predict_every_token_but_the_first_once():
    spans = windows(40, 16)
    assert spans == [(0, 16), (16, 16), (32, 7)]
    assert sum(length for _, length in spans) == 39


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_loss_equals_a_by_hand_mean_over_windows(models, kind):
    model_dir = models / kind
    report = report_for(model_dir, HELD_OUT)
    model, cfg, _, _ = load_model(model_dir)
    model.eval()
    ids = load_tokenizer(model_dir).encode(HELD_OUT)
    S, weighted, count = cfg.block_size, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, S):  # the model's own mean loss, one window a time
            x = torch.tensor([ids[start:start + S]])
            y = torch.tensor([ids[start + 1:start + 1 + S]])
            x = x[:, :y.shape[1]]
            _, loss = model(x, y)
            weighted += loss.item() * y.shape[1]
            count += y.shape[1]
    assert report["predicted_tokens"] == count == len(ids) - 1
    assert report["loss"] == pytest.approx(weighted / count, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(weighted / count), rel=1e-5)
    assert len(report["layers"]) == 2
    assert sum(report["layers"][0]["expert_share"]) == pytest.approx(1.0)


def test_bits_per_byte_counts_utf8_bytes(models):
    ascii_text = HELD_OUT.replace("é", "e")
    char = report_for(models / "char", ascii_text)
    assert char["bytes"] == char["predicted_tokens"]  # one byte per character token
    assert char["bits_per_byte"] == pytest.approx(char["loss"] / math.log(2), rel=1e-12)
    accented = report_for(models / "char", HELD_OUT)
    assert accented["bytes"] == len(HELD_OUT[1:].encode("utf-8")) > accented["predicted_tokens"]
    bpe = report_for(models / "bpe", HELD_OUT)
    tok = load_tokenizer(models / "bpe")
    ids = tok.encode(HELD_OUT)
    # A byte-level BPE token string has one character per byte it stands for.
    assert bpe["bytes"] == sum(len(tok.vocab[i]) for i in ids[1:])
    assert bpe["bits_per_byte"] == pytest.approx(
        bpe["loss"] * bpe["predicted_tokens"] / math.log(2) / bpe["bytes"], rel=1e-12)


def test_batch_size_does_not_change_the_figures(models):
    one, many = report_for(models / "bpe", HELD_OUT, 1), report_for(models / "bpe", HELD_OUT, 7)
    assert one["loss"] == pytest.approx(many["loss"], rel=1e-6)
    assert one["layers"][1]["expert_share"] == many["layers"][1]["expert_share"]


def test_eval_command_prints_and_writes_json(models, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(HELD_OUT)
    (docs / "b.txt").write_text(TRAIN[:500])
    code, out, err = himoe(["eval", "--model-dir", models / "char", "--data-file", docs,
                            "--json", tmp_path / "r.json", "--lm_eval_task",
                            tmp_path / "task"], capsys)
    assert code == 0, err
    assert "bits per byte" in out and "eval" in err  # the table and the progress bar
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["documents"] == 2 and report["tokenizer"] == "char"
    assert f"{report['bits_per_byte']:.4f}" in out
    rows = [json.loads(line) for line in
            (tmp_path / "task" / f"{TASK_NAME}.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == load_documents(docs).texts
    assert "loglikelihood_rolling" in (tmp_path / "task" / f"{TASK_NAME}.yaml").read_text()


def test_eval_bad_input_is_one_line(models, tmp_path, capsys):
    code, _, err = himoe(["eval", "--model_dir", models / "char", "--data_file",
                          tmp_path / "*.none"], capsys)
    assert_one_line_error(code, err, "matches no files")
    (tmp_path / "one.txt").write_text("x")
    code, _, err = himoe(["eval", "--model_dir", models / "char", "--data_file",
                          tmp_path / "one.txt"], capsys)
    assert_one_line_error(code, err, "fewer than 2 tokens")


def test_lm_eval_loads_the_local_task(models, tmp_path, capsys, monkeypatch):
    """Only where lm-evaluation-harness is installed: it reads the task himoe writes, over
    the same documents, and counts the same bytes."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    shutil.copy(models / "held_out.txt", tmp_path / "held_out.txt")
    code, _, err = himoe(["eval", "--model_dir", models / "bpe", "--data_file",
                          tmp_path / "held_out.txt", "--lm_eval_task", tmp_path / "task"], capsys)
    assert code == 0, err
    manager = TaskManager(include_path=str(tmp_path / "task"))
    task = manager.load([TASK_NAME])["tasks"][TASK_NAME]
    docs = list(task.test_docs())
    assert [task.doc_to_target(d) for d in docs] == [HELD_OUT]
    assert task.process_results(docs[0], [-1.0])["bits_per_byte"] == \
        (-1.0, len(HELD_OUT.encode("utf-8")))
