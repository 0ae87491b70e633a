"""End to end, as a user runs it: `himoe train`, `train_himoe.py`, `--resume`, `generate`."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.checkpoint.test_checkpoint import expected_files

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--n_embd", "32", "--n_head", "2", "--block_size", "32", "--num_moes", "3",
        "--num_experts", "2", "--batch_size", "4", "--max_iters", "20", "--eval_interval", "10",
        "--eval_iters", "2", "--device", "cpu"]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def files_in(model_dir: Path) -> set[str]:
    return {str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("n_layer", [1, 2])
def test_train_writes_everything_the_card_promises(n_layer, tmp_path):
    model_dir = tmp_path / "model"
    r = run("-m", "himoe", "train", *TINY, "--n_layer", str(n_layer),
            "--model_dir", str(model_dir))
    assert r.returncode == 0, r.stderr
    assert "parameters:" in r.stdout and "active per token" in r.stdout
    steps = re.search(r"steps: 20 of 128 tokens, ([\d.]+) passes over the ([\d,]+) training",
                      r.stdout)
    assert float(steps[1]) == pytest.approx(20 * 128 / int(steps[2].replace(",", "")), abs=0.05)
    assert "Expert utilisation" in r.stdout and "moe_expert_003" in r.stdout
    outputs = {"sample.txt", "routing_log.json", "metrics.jsonl", "train_state.pt",
               "loss_curves.png", "expert_load.png", ".himoe-lock"}  # the writer lock's file
    assert files_in(model_dir) == expected_files(n_layer, 3, 2) | outputs
    for path in model_dir.rglob("*.pt"):
        torch.load(path, weights_only=True)
    meta = json.loads((model_dir / "config.json").read_text())
    assert meta["step"] == 20 and meta["config"]["n_layer"] == n_layer and meta["vocab"]
    assert len((model_dir / "sample.txt").read_text()) == 400  # 400 character tokens
    log = json.loads((model_dir / "routing_log.json").read_text())
    assert len(log) == 50
    k = meta["config"]["top_k_groups"] * meta["config"]["top_k_experts"]  # 2 by default
    for entry in log:
        assert [c["layer"] for c in entry["routing"]] == [
            layer for layer in range(1, n_layer + 1) for _ in range(k)]
        assert all(1 <= c["group"] <= 3 and 1 <= c["expert"] <= 2 for c in entry["routing"])
    evals = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [10, 20]
    assert all(len(e["layers"]) == n_layer and e["val_loss"] > 0 for e in evals)


@pytest.mark.slow
def test_card_script_resume_and_generate(tmp_path):
    model_dir = tmp_path / "run_01"
    dashed = [a.replace("_", "-") for a in TINY]  # dashed spellings work too
    r = run("train_himoe.py", *dashed, "--model-dir", str(model_dir))
    assert r.returncode == 0, r.stderr
    r = run("train_himoe.py", "--resume", "--max_iters", "30", "--model_dir", str(model_dir))
    assert r.returncode == 0, r.stderr
    assert json.loads((model_dir / "config.json").read_text())["step"] == 30
    steps = [json.loads(x)["step"] for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]
    r = run("-m", "himoe", "generate", "--model_dir", str(model_dir), "--prompt", "HAMLET:",
            "--max_new_tokens", "40", "--temperature", "0.8", "--top_k", "10", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("HAMLET:") and len(r.stdout.rstrip("\n")) == 47


@pytest.mark.parametrize("args,needle", [
    (["train", "--n_embd", "30", "--n_head", "4"], "not divisible"),
    (["train", "--lr", "fast"], "--lr needs a float"),
    (["train", "--top_k_experts", "9"], "--top_k_experts 9 is larger than the 8 experts"),
    (["train", "--batch_size", "0"], "positive"),
    (["train", "--data_file", "/nonexistent/corpus.txt"], "does not exist"),
    (["train", "--resume", "--model_dir", "/nonexistent/model"], "does not exist"),
    (["generate", "--model_dir", "/nonexistent/model"], "does not exist"),
    (["train", "--routr", "dense"], "unrecognized"),
    (["train", "--router", "topk", "--router_jitter", "0.01"],
     "--router_jitter is not an option of --router topk; drop --router_jitter, or pick a "
     "router that has it: hierarchical"),
    (["train", "--router_jitter", "1"], "--router_jitter must be below 1"),
    (["train", "--load_coef", "0.1"], "--load_coef needs --noisy_gating"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_code_2(args, needle, tmp_path):
    r = run("-m", "himoe", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "model").exists()  # nothing written
