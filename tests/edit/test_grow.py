"""`himoe experts add`: one more expert in one group; the model loads, routes as before where
nothing changed, resumes exactly, and `--train_only` can then train just the new parts."""

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch

from himoe.checkpoint import card as checkpoint
from himoe.checkpoint.verify import verify
from himoe.config import HiMoEConfig
from himoe.edit.grow import grown_config, grown_train_state
from himoe.training.trainer import Trainer
from tests.cli.test_bad_input import assert_one_line_error, himoe
from tests.edit.test_experts import small_config
from tests.training.test_train_only import weight_digests

NEW_EXPERT = "layer_01_moe_expert_002/model_003.pt"
ROUTER = "layer_01_moe_expert_002/router.pt"


@pytest.fixture
def base(tmp_path):
    """2 layers of 2 groups x 2 experts trained 2 steps, with loss-free balancing on (router
    files then carry a per-expert bias that must widen too)."""
    cfg = small_config(tmp_path / "m", bias_update_rate=0.01)
    Trainer(cfg, out=io.StringIO()).train()
    return cfg


def add(model_dir, capsys, *extra):
    code, out, err = himoe(["experts", "add", "--model_dir", model_dir, "--layer", 1,
                            "--group", 2, *extra], capsys)
    assert code == 0, err
    return out


def test_add_writes_one_file_widens_one_router_and_keeps_the_rest(base, capsys):
    model_dir = Path(base.model_dir)
    before = weight_digests(model_dir)
    old_model, *_ = checkpoint.load_model(model_dir)
    out = add(model_dir, capsys, "--init", "copy:1")
    assert "added expert 3 to group 2 of layer 1" in out
    after = weight_digests(model_dir)
    assert set(after) - set(before) == {NEW_EXPERT}
    assert {rel for rel in before if before[rel] != after[rel]} == {ROUTER}
    assert after[NEW_EXPERT] == before["layer_01_moe_expert_002/model_001.pt"]  # copy:1
    router = checkpoint.load_weight_file(model_dir, ROUTER)
    assert router["weight"].shape[0] == 3 and router["balance_bias"].shape == (3,)
    assert torch.equal(router["weight"][2], router["weight"][0])
    meta = json.loads((model_dir / checkpoint.CONFIG_FILE).read_text())
    assert meta["config"]["group_experts"] == [[2, 3], [2, 2]]
    assert meta["config"]["num_experts"] == 3
    assert not verify(model_dir)[0]
    # The grown model keeps every old expert at its (group, index), and empty slots of the
    # smaller groups are never routed to.
    new_model, cfg, *_ = checkpoint.load_model(model_dir)
    old_sd, new_sd = old_model.state_dict(), new_model.state_dict()
    for layer in range(2):
        key = f"blocks.{layer}.ffn.experts.w1_EDF"
        for g, n in enumerate(old_model.cfg.group_sizes(layer)):
            for j in range(n):
                assert torch.equal(old_sd[key][g * 2 + j], new_sd[key][g * 3 + j])
    new_model.eval()
    old_model.eval()
    x = torch.randint(0, cfg.vocab_size, (4, cfg.block_size))
    new_model(x)
    old_model(x)
    for layer in range(2):
        ids_new = new_model.moe_layers[layer].last_ids_TK
        assert set(ids_new.flatten().tolist()) <= set(cfg.real_slots(layer))
    # Layer 2 did not change at all: the same routing (in the new slot numbering), if the
    # same tokens reach it, which they do when layer 1 routes no token to the twin.
    ids_old = old_model.moe_layers[0].last_ids_TK
    ids_mapped = (ids_old // 2) * 3 + ids_old % 2
    if torch.equal(ids_mapped, new_model.moe_layers[0].last_ids_TK):
        assert torch.equal((old_model.moe_layers[1].last_ids_TK // 2) * 3
                           + old_model.moe_layers[1].last_ids_TK % 2,
                           new_model.moe_layers[1].last_ids_TK)


@pytest.mark.slow  # seconds of whole training runs
def test_train_only_the_new_parts_after_add(base, capsys):
    model_dir = Path(base.model_dir)
    add(model_dir, capsys)  # random initialisation
    before = weight_digests(model_dir)
    spec = "layer1.group2.router,layer1.group2.expert3"
    code, out, err = himoe(["train", "--resume", "--model_dir", model_dir, "--max_iters", 6,
                            "--train_only", spec], capsys)
    assert code == 0, err
    after = weight_digests(model_dir)
    assert {rel for rel in before if before[rel] != after[rel]} <= {ROUTER, NEW_EXPERT}
    assert before[ROUTER] != after[ROUTER]
    assert not verify(model_dir)[0]
    # ... and a plain --resume then trains the whole grown model.
    code, _, err = himoe(["train", "--resume", "--model_dir", model_dir, "--max_iters", 8],
                         capsys)
    assert code == 0, err
    assert weight_digests(model_dir)["backbone.pt"] != after["backbone.pt"]


def test_resume_after_add_keeps_the_optimiser_moments_of_every_expert(base):
    model_dir = Path(base.model_dir)
    old_cfg, _, _ = checkpoint.read_config(model_dir)
    state = checkpoint.load_weight_file(model_dir, checkpoint.TRAIN_STATE_FILE, plain=False)
    new_cfg = grown_config(old_cfg, 0, 1)
    grown = grown_train_state(state, old_cfg, new_cfg)
    old_moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    new_moments = [s["exp_avg"] for s in grown["optimizer"]["state"].values()]
    moved = [(o, n) for o, n in zip(old_moments, new_moments) if o.shape != n.shape]
    # Per layer: the four expert tensors, plus the level-2 router weights.
    assert len(moved) == 2 * 5
    for o, n in moved:
        o_flat, n_flat = o.reshape(4, -1), n.reshape(6, -1)  # [N * M, ...] either way
        for g in range(2):
            for j in range(2):
                assert torch.equal(o_flat[g * 2 + j], n_flat[g * 3 + j])
        assert not n_flat[[2, 5]].any()  # the new expert's slot and the empty one start at 0
    for o, n in zip(old_moments, new_moments):
        if o.shape == n.shape:
            assert torch.equal(o, n)


def test_group_sizes_become_uniform_again():
    cfg = HiMoEConfig(n_layer=1, num_moes=2, num_experts=2, vocab_size=10)
    once = grown_config(cfg, 0, 0)
    assert once.group_experts == [[3, 2]] and once.num_experts == 3
    twice = grown_config(once, 0, 1)
    assert twice.group_experts is None and twice.num_experts == 3


def test_add_refuses_bad_input_in_one_line(base, tmp_path, capsys):
    model_dir = base.model_dir
    args = ["experts", "add", "--model_dir", model_dir]
    code, _, err = himoe([*args, "--layer", 3, "--group", 1], capsys)
    assert_one_line_error(code, err, "--layer 3 does not exist")
    code, _, err = himoe([*args, "--layer", 1, "--group", 1, "--init", "copy:5"], capsys)
    assert_one_line_error(code, err, "the group has experts 1-2")
    code, _, err = himoe([*args, "--layer", 1, "--group", 1, "--init", "zeros"], capsys)
    assert_one_line_error(code, err, "is not 'random' or 'copy:J'")
    flat = small_config(tmp_path / "flat", router="topk")
    Trainer(flat, out=io.StringIO()).train()
    capsys.readouterr()  # the training bar
    code, _, err = himoe(["experts", "add", "--model_dir", flat.model_dir, "--layer", 1,
                          "--group", 1], capsys)
    assert_one_line_error(code, err, "works on hierarchical models")


def test_expert_spec_limits_follow_the_group(base, capsys):
    add(base.model_dir, capsys)
    args = ["train", "--resume", "--model_dir", base.model_dir, "--max_iters", 4]
    code, _, err = himoe([*args, "--train_only", "layer1.group1.expert3"], capsys)
    assert_one_line_error(code, err, "group 1 of layer 1 has experts 1-2")
    cfg = dataclasses.replace(checkpoint.read_config(Path(base.model_dir))[0])
    assert cfg.group_sizes(0) == [2, 3]
