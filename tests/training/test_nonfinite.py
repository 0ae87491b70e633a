"""A non-finite loss or gradient norm: stop with one line naming the step and keep the last
good checkpoint, or with --skip_nonfinite skip the step (no update), count it and log it."""

import json
import math

import pytest
import torch

from himoe.checkpoint import card as checkpoint
from himoe.distributed import plan as plan_module  # train_step clips through Parallel
from himoe.model import HiMoEModel
from tests.cli.test_bad_input import SMALL, TEXT, himoe

BAD_STEP = 3



def poison(monkeypatch, where: str) -> None:
    """Make training step BAD_STEP non-finite: its loss (forward) or its gradient norm."""
    calls = {"n": 0}
    if where == "loss":
        forward = HiMoEModel.forward

        def nan_forward(self, *args, **kwargs):
            logits, loss = forward(self, *args, **kwargs)
            if self.training and loss is not None:
                calls["n"] += 1
                if calls["n"] == BAD_STEP:
                    loss = loss * float("nan")
            return logits, loss

        monkeypatch.setattr(HiMoEModel, "forward", nan_forward)
    else:
        clip = plan_module.clip_grad_norm

        def inf_clip(params, max_norm, optimizer=None):
            norm = clip(params, max_norm, optimizer)
            calls["n"] += 1
            return torch.tensor(math.inf) if calls["n"] == BAD_STEP else norm

        monkeypatch.setattr(plan_module, "clip_grad_norm", inf_clip)


def train_argv(tmp_path, *extra):
    (tmp_path / "corpus.txt").write_text(TEXT)
    return ["train", *SMALL, "--max_iters", "6", "--eval_interval", "2", "--data_file",
            tmp_path / "corpus.txt", "--model_dir", tmp_path / "m", *extra]


@pytest.mark.parametrize("where", ["loss", "grad_norm"])
def test_a_nonfinite_step_stops_the_run_and_keeps_the_last_good_checkpoint(
        where, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, where)
    code, out, err = himoe(train_argv(tmp_path), capsys)
    errors = [line for line in err.splitlines() if line.startswith("himoe:")]
    assert code == 2 and "Traceback" not in err
    assert len(errors) == 1 and f"step {BAD_STEP} gave a non-finite" in errors[0], err
    assert "(step 2) is kept" in errors[0] and "--skip_nonfinite" in errors[0]
    monkeypatch.undo()
    assert himoe(["verify", "--model_dir", tmp_path / "m"], capsys)[0] == 0
    model, _, _, step = checkpoint.load_model(tmp_path / "m")
    assert step == 2 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("where", ["loss", "grad_norm"])
def test_skip_nonfinite_skips_the_update_counts_and_logs_it(where, tmp_path, monkeypatch,
                                                            capsys):
    poison(monkeypatch, where)
    code, out, err = himoe(train_argv(tmp_path, "--skip_nonfinite"), capsys)
    assert code == 0, err
    assert f"step {BAD_STEP}: non-finite loss" in out and "update skipped (1 skipped" in out
    model_dir = tmp_path / "m"
    state = torch.load(model_dir / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and state["skipped_steps"] == 1
    # AdamW counts its updates: one fewer than the steps run.
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {5.0}
    evals = [json.loads(line) for line in (model_dir / "metrics.jsonl").open()]
    assert [e["skipped_steps"] for e in evals] == [0, 1, 1]
    model, *_ = checkpoint.load_model(model_dir)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
