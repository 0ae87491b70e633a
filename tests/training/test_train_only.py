"""`himoe train --resume --train_only SPEC`: only the named files train; every other weight
file stays byte for byte, in memory as on disk, and a later plain --resume still works."""

import dataclasses
import io
from pathlib import Path

import pytest
import torch

from himoe.checkpoint import card as checkpoint
from himoe.checkpoint import manifest as mf
from himoe.checkpoint.verify import verify
from himoe.edit.specs import spec_files
from himoe.training.freeze import owner_files
from himoe.training.trainer import Trainer
from tests.cli.test_bad_input import assert_one_line_error, himoe
from tests.edit.test_experts import small_config

SPEC = "layer1.group2.expert1,layer2.router,layer1.group1.router"
TRAINED = {"layer_01_moe_expert_002/model_001.pt", "layer_02_main_router.pt",
           "layer_01_moe_expert_001/router.pt"}


def weight_digests(model_dir):
    return {str(p.relative_to(model_dir)): mf.sha256_file(p) for p in model_dir.rglob("*.pt")
            if p.name != checkpoint.TRAIN_STATE_FILE}


@pytest.fixture
def base(tmp_path):
    """A model trained for 2 steps, with loss-free balancing (router buffers that move)."""
    cfg = small_config(tmp_path / "m", bias_update_rate=0.01, eval_interval=2)
    Trainer(cfg, out=io.StringIO()).train()
    return cfg


def test_only_the_named_files_change(base):
    model_dir = Path(base.model_dir)
    before = weight_digests(model_dir)
    before_model, *_ = checkpoint.load_model(model_dir)
    assert set(spec_files(SPEC, before_model.cfg, "--train_only")) == TRAINED
    cfg = dataclasses.replace(base, max_iters=6)
    trainer = Trainer(cfg, resume=True, out=io.StringIO(), train_only=SPEC)
    trainer.train()
    after = weight_digests(model_dir)
    assert {rel for rel in before if before[rel] != after[rel]} == TRAINED
    # In memory too: every frozen slice is exactly as loaded (restored after each step).
    old, new = before_model.state_dict(), trainer.model.state_dict()
    for key, value in old.items():
        owners = owner_files(cfg, key)
        rows = [owners] * len(value) if isinstance(owners, str) else owners
        for r, owner in enumerate(rows):
            if owner not in TRAINED:
                assert torch.equal(value[r], new[key][r]), (key, r)
    assert not verify(model_dir)[0]
    # A later plain --resume loads the optimiser state and trains everything again.
    Trainer(dataclasses.replace(base, max_iters=8), resume=True, out=io.StringIO()).train()
    final = weight_digests(model_dir)
    assert final["backbone.pt"] != after["backbone.pt"]
    assert final["layer_02_moe_expert_001/router.pt"] != after["layer_02_moe_expert_001/router.pt"]


def test_bad_train_only_is_one_line(base, capsys):
    args = ["train", "--resume", "--max_iters", "4", "--model_dir", base.model_dir]
    code, _, err = himoe([*args, "--train_only", "layer3.group1"], capsys)
    assert_one_line_error(code, err, "there is no layer 3")
    code, _, err = himoe([*args, "--train_only", "experts"], capsys)
    assert_one_line_error(code, err, "is not a SPEC")
    code, _, err = himoe(["train", "--train_only", "layer1", "--model_dir", base.model_dir],
                         capsys)
    assert_one_line_error(code, err, "add --resume")
