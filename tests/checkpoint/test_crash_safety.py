"""Nothing lost: atomic saves, recovery from an interrupted save, `himoe verify`, SIGKILL at
random moments, and an exact resume for routers that carry buffers."""

import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from himoe.checkpoint import atomic_dir
from himoe.checkpoint import card as checkpoint
from himoe.checkpoint import manifest as mf
from himoe.cli import main
from himoe.model import HiMoEModel
from himoe.training.trainer import Trainer
from tests.cli.test_bad_input import SMALL, TEXT, himoe, tree
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]
STAGING = atomic_dir.STAGING_DIR



def model_and_dir(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = HiMoEModel(tiny_config(n_embd=16, num_moes=2, num_experts=2))
    vocab = [chr(65 + i) for i in range(model.cfg.vocab_size)]
    return model, vocab, tmp_path / "m"


def digests(model_dir: Path) -> dict:
    return {str(p.relative_to(model_dir)): mf.sha256_file(p)
            for p in model_dir.rglob("*") if p.is_file()}


def test_manifest_lists_every_file_of_the_save(tmp_path):
    model, vocab, d = model_and_dir(tmp_path)
    checkpoint.save_model(model, vocab, 3, d, extra={"train_state.pt": {"step": 3}})
    manifest = mf.read(d / "manifest.json")
    on_disk = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    assert manifest["step"] == 3 and not mf.check(d, manifest)
    assert not (d / STAGING).exists()


def test_a_save_of_another_shape_leaves_no_stale_weight_files(tmp_path):
    from tests.checkpoint.test_checkpoint import expected_files

    d = tmp_path / "m"
    one = HiMoEModel(tiny_config(n_embd=16, n_layer=1, num_moes=3, num_experts=2))
    two = HiMoEModel(tiny_config(n_embd=16, n_layer=2, num_moes=2, num_experts=2))
    vocab = [chr(65 + i) for i in range(20)]
    checkpoint.save_model(one, vocab, 1, d, extra={"metrics.jsonl": "{}\n"})
    checkpoint.save_model(two, vocab, 1, d)
    files = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}
    assert files == expected_files(2, 2, 2) | {"metrics.jsonl"}  # history stays
    assert not (d / "moe_expert_003").exists()


def test_a_write_that_fails_mid_save_leaves_the_previous_save(tmp_path, monkeypatch):
    model, vocab, d = model_and_dir(tmp_path)
    checkpoint.save_model(model, vocab, 1, d, extra={"train_state.pt": {"step": 1}})
    before = digests(d)
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(checkpoint.UserError, match="step 1 is kept"):
        checkpoint.save_model(model, vocab, 2, d, extra={"train_state.pt": {"step": 2}})
    assert digests(d) == before and not (d / STAGING).exists()


def crash_after_commit(monkeypatch, moves_before_crash: int):
    """Make os.replace die (as a kill would: no cleanup runs) after N moves into place."""
    real_replace, moves = os.replace, []

    class Killed(BaseException):
        pass

    def replace(src, dst):
        if STAGING in str(src) and "manifest.json.tmp" not in str(src):
            moves.append(dst)
            if len(moves) > moves_before_crash:
                raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return Killed


@pytest.mark.parametrize("moves_before_crash", [0, 4])
def test_a_save_killed_after_its_commit_is_rolled_forward(tmp_path, monkeypatch, capsys,
                                                          moves_before_crash):
    old, vocab, d = model_and_dir(tmp_path, seed=0)
    new, _, _ = model_and_dir(tmp_path, seed=1)
    checkpoint.save_model(old, vocab, 1, d)
    killed = crash_after_commit(monkeypatch, moves_before_crash)
    with pytest.raises(killed):
        checkpoint.save_model(new, vocab, 2, d)
    monkeypatch.undo()
    assert (d / STAGING / "manifest.json").is_file()  # committed, not yet in place
    loaded, _, _, step = checkpoint.load_model(d)
    assert "completed an interrupted save of step 2" in capsys.readouterr().err
    assert step == 2 and not (d / STAGING).exists()
    for key, value in new.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_save_killed_before_its_commit_is_rolled_back(tmp_path, capsys):
    model, vocab, d = model_and_dir(tmp_path)
    checkpoint.save_model(model, vocab, 1, d)
    before = digests(d)
    (d / STAGING / "layer_01_moe_expert_001").mkdir(parents=True)  # as a kill leaves it
    (d / STAGING / "backbone.pt").write_bytes(b"half of a new file")
    (d / STAGING / "layer_01_moe_expert_001" / "router.pt").write_bytes(b"new")
    assert checkpoint.read_config(d)[2] == 1
    err = capsys.readouterr().err.strip()
    assert err == f"himoe: discarded an interrupted save in {d}; the complete save of step 1 " \
                  "is kept"
    assert digests(d) == before and not (d / STAGING).exists()


def test_a_manifest_cannot_reach_outside_the_model_dir(tmp_path):
    model, vocab, d = model_and_dir(tmp_path)
    checkpoint.save_model(model, vocab, 1, d)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"]["../victim.txt"] = {"size": 7, "sha256": "0" * 64}
    (d / "manifest.json").write_text(json.dumps(manifest))
    checkpoint.save_model(model, vocab, 2, d)  # would delete files the old manifest listed
    assert victim.read_text() == "keep me"
    assert _run_verify(d)[0] == 0
    (d / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = _run_verify(d)
    assert code == 2 and "not a plain path inside the directory" in err


def _run_verify(model_dir) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(["verify", "--model_dir", str(model_dir)])
    return code, out.getvalue(), err.getvalue()


def test_verify_reports_each_problem_on_one_line(tmp_path):
    model, vocab, d = model_and_dir(tmp_path)
    checkpoint.save_model(model, vocab, 5, d)
    code, out, err = _run_verify(d)
    assert code == 0 and err == ""
    assert out.startswith(f"OK {d}: ") and "files match manifest.json, step 5" in out
    shutil.copy(d / "layer_01_moe_expert_001" / "router.pt",  # same size, other weights
                d / "layer_01_moe_expert_002" / "router.pt")
    (d / "layer_02_moe_expert_001" / "model_002.pt").unlink()
    code, out, err = _run_verify(d)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 2, err
    assert "router.pt differs from the file that was saved" in err
    assert "model_002.pt is listed in manifest.json but missing" in err
    (d / "manifest.json").unlink()
    code, _, err = _run_verify(d)
    assert code == 2 and "manifest.json is missing" in err


# --- SIGKILL at random moments ---

def start(model_dir: Path, corpus: Path, resume: bool, slow: str | None):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny model: one thread, as in conftest.py
    env.pop(atomic_dir.SLOW_SAVE_ENV, None)
    if slow:
        env[atomic_dir.SLOW_SAVE_ENV] = slow
    args = ["--resume", "--model_dir", str(model_dir)] if resume else [
        *SMALL, "--max_iters", "24", "--eval_interval", "2", "--data_file", str(corpus),
        "--model_dir", str(model_dir)]
    return subprocess.Popen([sys.executable, "-m", "himoe", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(proc, condition, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"train ended before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def staging_has_files(staging: Path) -> bool:
    try:
        return any(staging.iterdir())
    except OSError:  # not there (yet, or any more)
        return False


def kill(proc):
    proc.kill()  # SIGKILL: no handler, no cleanup, no flush
    proc.wait()
    proc.stderr.close()


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_a_save(tmp_path, capsys):
    """Four runs of `python -m himoe train` on one directory, the first three killed with
    SIGKILL: at a random moment, right after a save's commit point, and inside a save's
    writes. After each kill `himoe verify` passes once a save exists, and a --resume (on a
    copy, in this process) runs to completion; the last run completes the directory itself."""
    rng = random.Random(6)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    model_dir = tmp_path / "model"
    staging = model_dir / STAGING
    seen = set()

    def after_kill(label):
        committed = (staging / "manifest.json").exists()
        note = "completed an interrupted save" if committed else \
            "discarded an interrupted save" if any(p.is_file() for p in staging.rglob("*")) \
            else None
        if staging.exists():
            seen.add("forward" if committed else "back")
        if not (model_dir / "manifest.json").exists() and not committed:
            return False  # killed before any save completed: nothing to verify yet
        code, out, err = himoe(["verify", "--model_dir", model_dir], capsys)
        assert code == 0 and out.startswith("OK "), f"{label}: {err}"
        assert note is None or note in err, f"{label}: {err}"
        assert not staging.exists()
        copy = tmp_path / f"copy_{label}"
        shutil.copytree(model_dir, copy)
        code, _, err = himoe(["train", "--resume", "--model_dir", copy], capsys)
        assert code == 0, f"{label}: {err}"
        assert checkpoint.read_config(copy)[2] == 24
        return True

    # 1. a random moment after the first save began (with slow saves, often inside one)
    proc = start(model_dir, corpus, resume=False, slow="0.01")
    wait_for(proc, staging.exists, "the first save")
    time.sleep(rng.uniform(0.0, 0.6))
    kill(proc)
    resumable = after_kill("random")
    # 2. right after a save's commit point, while its files are being moved into place
    proc = start(model_dir, corpus, resume=resumable, slow="0.02")
    wait_for(proc, lambda: (staging / "manifest.json").exists(), "a committed save")
    kill(proc)
    assert after_kill("committed")
    # 3. inside a save's writes, before its commit point
    proc = start(model_dir, corpus, resume=True, slow="0.02")
    wait_for(proc, lambda: staging_has_files(staging), "a save to begin")
    time.sleep(rng.uniform(0.0, 0.05))
    kill(proc)
    assert after_kill("writing")
    assert seen == {"forward", "back"}, seen
    # 4. the run itself completes
    proc = start(model_dir, corpus, resume=True, slow=None)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert himoe(["verify", "--model_dir", model_dir], capsys)[0] == 0
    steps = [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").open()]
    assert steps == list(range(2, 25, 2))  # every evaluation once, none lost or doubled
    # hidden: only the writer lock's file, which stays (a failed command then changes nothing)
    assert [n for n in tree(model_dir) if n.startswith(".")] == [atomic_dir.LOCK_FILE]


# --- exact resume with router buffers ---

@pytest.mark.parametrize("router", [
    dict(router="grouped"),  # logit EMA buffer
    dict(router="hierarchical", bias_update_rate=0.01),  # loss-free balancing biases
], ids=["grouped", "balance_bias"])
def test_resume_is_exact_for_routers_with_buffers(router, tmp_path):
    def cfg(name):
        return tiny_config(n_embd=16, num_moes=2, num_experts=2, batch_size=2, max_iters=4,
                           eval_interval=2, eval_iters=1, dropout=0.1, sample_tokens=8,
                           model_dir=str(tmp_path / name), **router)

    straight = Trainer(cfg("a"), out=io.StringIO()).train()
    first = Trainer(cfg("b"), out=io.StringIO()).train(stop_at=2)
    second = Trainer(cfg("b"), resume=True, out=io.StringIO()).train()
    assert first.train_losses + second.train_losses == straight.train_losses
    a, *_ = checkpoint.load_model(tmp_path / "a")
    b, *_ = checkpoint.load_model(tmp_path / "b")
    buffers = [name for name, _ in a.named_buffers()]
    assert any("router" in name for name in buffers)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
