"""`himoe experts prune`: experts go with their router rows, balancing biases and optimiser
moments; the rest stays byte for byte or moves to a lower number with its bytes unchanged."""

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from himoe.checkpoint import atomic_dir
from himoe.checkpoint import card as checkpoint
from himoe.checkpoint.card_layout import slot_layer
from himoe.checkpoint.verify import verify
from himoe.config import HiMoEConfig
from himoe.edit.prune import below_share, beyond_best, kept_experts, pruned_config
from himoe.errors import UserError
from himoe.model import HiMoEModel
from himoe.training.optim import build_optimizer
from himoe.training.trainer import Trainer
from tests.checkpoint.test_crash_safety import ROOT, STAGING, kill, staging_has_files, wait_for
from tests.cli.test_bad_input import assert_one_line_error, himoe, tree
from tests.edit.test_experts import digests, small_config

ONLY = "layer1.group1.expert1,layer2.group2.expert3"
G11, G22 = "layer_01_moe_expert_001", "layer_02_moe_expert_002"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """2 layers of 2 groups x 3 experts trained 2 steps, with loss-free balancing on (the
    router files carry a per-expert bias that must shrink too)."""
    cfg = small_config(tmp_path_factory.mktemp("prune") / "m", num_experts=3,
                       bias_update_rate=0.01)
    Trainer(cfg, out=io.StringIO()).train()
    return Path(cfg.model_dir)


@pytest.fixture
def model_dir(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "m")
    return tmp_path / "m"


def prune(model_dir, capsys, *flags):
    return himoe(["experts", "prune", "--model_dir", model_dir, *flags], capsys)


def test_prune_by_name_renumbers_with_bytes_unchanged(model_dir, capsys):
    before = digests(model_dir)
    old_model, old_cfg, *_ = checkpoint.load_model(model_dir)
    old_routers = {g: checkpoint.load_weight_file(model_dir, f"{g}/router.pt")
                   for g in (G11, G22)}
    code, out, err = prune(model_dir, capsys, "--only", ONLY)
    assert code == 0, err
    assert f"{G11}/model_002.pt -> {G11}/model_001.pt" in out
    assert "validation loss" in out and out.rstrip().splitlines()[-1].startswith("OK ")
    after = digests(model_dir)
    assert after[f"{G11}/model_001.pt"] == before[f"{G11}/model_002.pt"]
    assert after[f"{G11}/model_002.pt"] == before[f"{G11}/model_003.pt"]
    assert set(before) - set(after) == {f"{G11}/model_003.pt", f"{G22}/model_003.pt"}
    changed = {rel for rel in after if after[rel] != before[rel]}
    assert changed == {f"{G11}/model_001.pt", f"{G11}/model_002.pt", f"{G11}/router.pt",
                       f"{G22}/router.pt", checkpoint.TRAIN_STATE_FILE}
    for group, keep in ((G11, [1, 2]), (G22, [0, 1])):
        router = checkpoint.load_weight_file(model_dir, f"{group}/router.pt")
        for entry in ("weight", "balance_bias"):
            assert torch.equal(router[entry], old_routers[group][entry][keep])
    meta = json.loads((model_dir / checkpoint.CONFIG_FILE).read_text())["config"]
    assert meta["group_experts"] == [[2, 3], [3, 2]] and meta["num_experts"] == 3
    assert meta["expert_index_map"] == [[[0, 1, 2], [1, 2, 3]], [[1, 2, 3], [1, 2, 0]]]
    assert not verify(model_dir)[0]
    # In memory each kept expert's slice and optimiser moments are its old ones.
    new_model, cfg, *_ = checkpoint.load_model(model_dir)
    key = "blocks.0.ffn.experts.w1_EDF"
    assert torch.equal(new_model.state_dict()[key][0], old_model.state_dict()[key][1])


def optimiser_moments(model_dir) -> tuple[HiMoEConfig, dict]:
    """(config, {parameter name: AdamW's first moment}) of a saved model."""
    cfg = checkpoint.read_config(model_dir)[0]
    model = HiMoEModel(cfg)
    name_of = {id(p): name for name, p in model.named_parameters()}
    order = [name_of[id(p)] for group in build_optimizer(model, cfg).param_groups
             for p in group["params"]]
    state = checkpoint.load_weight_file(model_dir, checkpoint.TRAIN_STATE_FILE, plain=False)
    return cfg, {order[i]: s["exp_avg"] for i, s in state["optimizer"]["state"].items()}


def test_the_optimiser_moments_follow_their_experts(model_dir, capsys):
    old_cfg, old = optimiser_moments(model_dir)
    assert prune(model_dir, capsys, "--only", ONLY)[0] == 0
    _, new = optimiser_moments(model_dir)
    # Each new slot's old slot (2 groups x 3 slots before and after); None: left empty.
    sources = {0: [1, 2, None, 3, 4, 5], 1: [0, 1, 2, 3, 4, None]}
    stacked = 0
    for name, o in old.items():
        layer = slot_layer(old_cfg, name)
        if layer is None:
            assert torch.equal(new[name], o)
            continue
        stacked += 1
        o6, n6 = o.reshape(6, -1), new[name].reshape(6, -1)
        for slot, src in enumerate(sources[layer]):
            assert torch.equal(n6[slot], o6[src]) if src is not None else not n6[slot].any()
    assert stacked == 2 * 5  # per layer the 4 expert tensors and the group routers' weights


def test_dry_run_changes_nothing(model_dir, capsys):
    before = tree(model_dir)
    code, out, err = prune(model_dir, capsys, "--keep_per_group", 2, "--dry_run")
    assert code == 0, err
    assert "dry run: nothing changed" in out and out.count("prune\n") == 4
    assert tree(model_dir) == before


@pytest.mark.slow  # a training run, generation and an export
def test_the_pruned_model_resumes_generates_and_exports(model_dir, tmp_path, capsys):
    code, _, err = prune(model_dir, capsys, "--keep_per_group", 2)
    assert code == 0, err
    assert checkpoint.read_config(model_dir)[0].num_experts == 2
    code, _, err = himoe(["train", "--resume", "--model_dir", model_dir, "--max_iters", 4],
                         capsys)
    assert code == 0, err
    assert checkpoint.read_config(model_dir)[2] == 4 and not verify(model_dir)[0]
    code, out, err = himoe(["generate", "--model_dir", model_dir, "--max_new_tokens", 8],
                           capsys)
    assert code == 0 and out, err
    code, _, err = himoe(["export-hf", "--model_dir", model_dir, "--out", tmp_path / "hf"],
                         capsys)
    assert code == 0, err


def test_selection_by_share():
    shares = {(0, 0, 0): 0.3, (0, 0, 1): 0.1, (0, 0, 2): 0.1, (0, 1, 0): 0.5}
    assert below_share(shares, 0.2) == ({(0, 0, 1), (0, 0, 2)}, [])
    # Group 1 of layer 1 has no expert at 0.4 or more: its busiest stays, the group is named.
    assert below_share(shares, 0.4) == ({(0, 0, 1), (0, 0, 2)}, [(0, 0)])
    assert below_share(shares, 0.4, keep_at_least=2) == ({(0, 0, 2)}, [(0, 0)])
    assert beyond_best(shares, 2) == {(0, 0, 2)}  # a tie: the lower number stays
    assert beyond_best(shares, 1) == {(0, 0, 1), (0, 0, 2)}


def test_pruning_twice_composes_the_map_and_uniform_groups_drop_group_experts():
    cfg = HiMoEConfig(n_layer=1, num_moes=2, num_experts=3, vocab_size=10)
    once = pruned_config(cfg, kept_experts(cfg, {(0, 0, 0)}))
    assert once.group_experts == [[2, 3]] and once.expert_index_map == [[[0, 1, 2], [1, 2, 3]]]
    twice = pruned_config(once, kept_experts(once, {(0, 1, 1)}))
    assert twice.group_experts is None and twice.num_experts == 2
    assert twice.expert_index_map == [[[0, 1, 2], [1, 0, 2]]]
    with pytest.raises(UserError, match="below|fewer than"):
        kept_experts(HiMoEConfig(n_layer=1, num_moes=1, num_experts=3, top_k_experts=2,
                                 vocab_size=10), {(0, 0, 0), (0, 0, 1)})


def test_a_broken_expert_index_map_is_refused():
    cfg = HiMoEConfig(n_layer=1, num_moes=1, num_experts=2, vocab_size=10)
    for bad in ([[[1, 1]]], [[[3, 0]]], [[[1, -1]]], [[1, 2]], [[[1, True]]]):
        with pytest.raises(UserError, match="expert_index_map must list"):
            dataclasses.replace(cfg, expert_index_map=bad).validate(origin="config.json")
    dataclasses.replace(cfg, expert_index_map=[[[0, 2, 1]]]).validate()


def test_prune_refuses_bad_input_in_one_line(model_dir, tmp_path, capsys):
    before = tree(model_dir)
    code, _, err = prune(model_dir, capsys, "--only", "backbone")
    assert_one_line_error(code, err, "names no routed experts")
    code, _, err = prune(model_dir, capsys, "--only", "layer3.group1.expert1")
    assert_one_line_error(code, err, "there is no layer 3")
    code, _, err = prune(model_dir, capsys, "--only", "layer1.group2")
    assert_one_line_error(code, err, "group 2 of layer 1 with no experts")
    code, _, err = prune(model_dir, capsys, "--min_share", 0)
    assert_one_line_error(code, err, "selects no expert")
    code, _, err = prune(model_dir, capsys, "--keep_per_group", 3)
    assert_one_line_error(code, err, "selects no expert")
    code, _, err = prune(model_dir, capsys, "--min_share", 0.5, "--data_file",
                         tmp_path / "gone.txt")
    assert_one_line_error(code, err, "need the corpus")
    assert tree(model_dir) == before
    for router in ("dense", "topk"):
        torch.manual_seed(0)
        cfg = small_config(tmp_path / router, router=router)
        other = Path(cfg.model_dir)
        checkpoint.save_model(HiMoEModel(cfg), [chr(65 + i) for i in range(cfg.vocab_size)],
                              0, other)
        code, _, err = prune(other, capsys, "--only", "layer1.group1.expert1")
        assert_one_line_error(code, err, "dense model" if router == "dense"
                              else "works on hierarchical models")


def test_without_the_corpus_prune_by_name_skips_the_loss(model_dir, tmp_path, capsys):
    code, out, err = prune(model_dir, capsys, "--only", "layer2.group1.expert3",
                           "--data_file", tmp_path / "gone.txt")
    assert code == 0, err
    assert len(err.strip().splitlines()) == 1 and "no validation loss" in err
    assert "validation loss" not in out and not verify(model_dir)[0]


@pytest.mark.slow  # two processes that import torch
def test_sigkill_leaves_the_model_as_before_or_pruned(model_dir, capsys):
    """`experts prune` killed inside its save's writes (before the commit point) leaves the
    model as it was; killed after the commit point, the next reader completes the prune."""
    before = digests(model_dir)
    staging = model_dir / STAGING

    def start():
        env = dict(os.environ, OMP_NUM_THREADS="1", **{atomic_dir.SLOW_SAVE_ENV: "0.02"})
        return subprocess.Popen([sys.executable, "-m", "himoe", "experts", "prune",
                                 "--model_dir", str(model_dir), "--only", ONLY], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)

    proc = start()
    wait_for(proc, lambda: staging_has_files(staging), "the save to begin")
    kill(proc)
    code, out, err = himoe(["verify", "--model_dir", model_dir], capsys)
    assert code == 0 and "discarded an interrupted save" in err, err
    assert digests(model_dir) == before
    proc = start()
    wait_for(proc, lambda: (staging / "manifest.json").exists(), "the commit point")
    kill(proc)
    code, out, err = himoe(["verify", "--model_dir", model_dir], capsys)
    assert code == 0 and "completed an interrupted save" in err, err
    assert checkpoint.read_config(model_dir)[0].group_experts == [[2, 3], [3, 2]]
    assert f"{G11}/model_003.pt" not in digests(model_dir)
