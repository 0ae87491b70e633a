"""`himoe upcycle`: a MoE that starts out computing what its dense model computes."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from himoe.checkpoint import atomic_dir
from himoe.checkpoint import card as checkpoint
from himoe.checkpoint.verify import verify
from himoe.edit.upcycle import step0_weight, upcycled_config, upcycled_model
from himoe.errors import UserError
from himoe.model import HiMoEModel
from himoe.model.routers.registry import RouterSpec, register_router, unregister_router
from himoe.training.trainer import Trainer
from tests.checkpoint.test_crash_safety import ROOT, STAGING, kill, staging_has_files, wait_for
from tests.cli.test_bad_input import assert_one_line_error, himoe
from tests.conftest import tiny_config
from tests.edit.test_experts import small_config

# Every built-in router, with a shared expert and without, top-1 and top-k.
SETTINGS = {"default": {}, "no_shared": dict(shared_fraction=0.0),
            "top2_top2": dict(top_k_groups=2, top_k_experts=2),
            "topk": dict(router="topk", top_k_experts=2),
            "topk_renorm": dict(router="topk", top_k_experts=3, renormalize=True),
            "grouped": dict(router="grouped"),
            "group_limited": dict(router="group_limited", top_k_groups=2, top_k_experts=2)}


def dense_model(shared_fraction=0.5):
    """A dense tiny model with every weight and bias away from its initial value (biases
    are 0 at initialisation, and where b2 goes matters)."""
    torch.manual_seed(0)
    cfg = tiny_config(router="dense", n_embd=16)
    model = HiMoEModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), cfg


@pytest.mark.parametrize("given", SETTINGS.values(), ids=SETTINGS)
def test_without_noise_the_moe_computes_the_dense_logits(given):
    dense, dense_cfg = dense_model()
    cfg = upcycled_config(dense_cfg, given)
    moe = upcycled_model(dense, cfg, noise=0.0, seed=0)
    x = torch.randint(0, dense_cfg.vocab_size, (3, dense_cfg.block_size))
    ref = dense(x)[0]
    # Equal to rounding only: w0 * (1 / w0) rounds (1/6 is no float) and the FFN's sum over
    # hidden units runs in two parts (shared, routed), so not bit for bit.
    torch.testing.assert_close(moe.eval()(x)[0], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moe.train()(x)[0], ref, rtol=1e-5, atol=1e-5)  # dropout 0
    assert moe.cfg.ffn_hidden + moe.cfg.shared_hidden == dense_cfg.ffn_hidden


def test_the_step0_weight_is_the_uniform_routing_weight():
    _, dense_cfg = dense_model()
    # Routing starts from himoe's defaults (6 groups x 8 experts), not the dense config's.
    for given, w0 in (({}, 2 / 48), (dict(top_k_groups=2, top_k_experts=2), 4 / 48),
                      (dict(router="topk", top_k_experts=2), 2 / 48),
                      (dict(router="topk", top_k_experts=2, renormalize=True), 1.0),
                      (dict(router="grouped"), 1.0)):
        assert step0_weight(upcycled_config(dense_cfg, given)) == pytest.approx(w0, rel=1e-6)


def gelu_bound(ffn, h_BTD, S: float, shared: int) -> torch.Tensor:
    """The elementwise bound of himoe.edit.upcycle on |MoE layer - dense FFN| for noise S:
    S |W2r| (1.13 (1 + S) (|W1r| |h| + |b1r|) + |gelu(W1r h + b1r)|), + S |b2| without a
    shared expert."""
    w1, b1, w2 = ffn.fc1.weight[shared:], ffn.fc1.bias[shared:], ffn.fc2.weight[:, shared:]
    spread = h_BTD.abs() @ w1.abs().t() + b1.abs()
    bound = S * ((1.13 * (1 + S) * spread + F.gelu(h_BTD @ w1.t() + b1).abs()) @ w2.abs().t())
    return bound if shared else bound + S * ffn.fc2.bias.abs()


def test_gelu_slope_is_at_most_1_13():
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64, requires_grad=True)
    F.gelu(x).sum().backward()
    assert x.grad.abs().max() <= 1.13


@pytest.mark.parametrize("given", [{}, dict(shared_fraction=0.0)], ids=["shared", "no_shared"])
def test_with_noise_each_layer_stays_within_the_bound(given):
    S = 0.05
    dense, dense_cfg = dense_model()
    cfg = upcycled_config(dense_cfg, given)
    moe = upcycled_model(dense, cfg, noise=S, seed=3).eval()
    w1 = moe.blocks[0].ffn.experts.w1_EDF
    assert not torch.equal(w1[0], w1[1])  # the copies differ
    inputs = {}
    for i, block in enumerate(moe.blocks):
        block.ln2.register_forward_hook(lambda m, a, out, i=i: inputs.__setitem__(i, out))
    with torch.no_grad():
        moe(torch.randint(0, dense_cfg.vocab_size, (3, dense_cfg.block_size)))
        for i, block in enumerate(moe.blocks):
            h = inputs[i]
            y_moe = block.ffn(h) + (block.shared_ffn(h) if block.shared_ffn else 0)
            gap = (y_moe - dense.blocks[i].ffn(h)).abs()
            bound = gelu_bound(dense.blocks[i].ffn, h, S, cfg.shared_hidden)
            assert gap.max() > 0
            assert (gap <= bound + 1e-5).all(), (gap - bound).max()


def test_a_router_without_gates_is_refused():
    register_router(RouterSpec("nogates", "test", lambda cfg, layer: None))
    try:
        with pytest.raises(UserError, match="names no gates"):
            upcycled_config(dense_model()[1], {"router": "nogates"})
    finally:
        unregister_router("nogates")


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    """A dense model trained two steps on the shipped Hamlet."""
    cfg = small_config(tmp_path_factory.mktemp("upcycle") / "dense", router="dense")
    Trainer(cfg, out=io.StringIO()).train()
    return Path(cfg.model_dir)


def upcycle(dense_dir, out, capsys, *extra):
    return himoe(["upcycle", "--from", dense_dir, "--model_dir", out, *extra], capsys)


def test_the_saved_moe_verifies_and_loads_with_the_dense_logits(dense_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    code, text, err = upcycle(dense_dir, out, capsys, "--num_moes", 3, "--num_experts", 2)
    assert code == 0, err
    assert "upcycled" in text and "--resume" in text
    assert not verify(out)[0]
    meta = json.loads((out / checkpoint.CONFIG_FILE).read_text())
    assert meta["step"] == 0 and meta["config"]["router"] == "hierarchical"
    assert (meta["config"]["num_moes"], meta["config"]["num_experts"]) == (3, 2)
    state = checkpoint.load_weight_file(out, checkpoint.TRAIN_STATE_FILE, plain=False)
    assert state["step"] == 0 and not state["optimizer"]["state"]  # a fresh optimiser
    dense, *_ = checkpoint.load_model(dense_dir)
    moe, cfg, vocab, _ = checkpoint.load_model(out)
    assert vocab == checkpoint.read_config(dense_dir)[1]
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    torch.testing.assert_close(moe.eval()(x)[0], dense.eval()(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a training run
def test_resume_trains_the_upcycled_model(dense_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    assert upcycle(dense_dir, out, capsys, "--noise", 0.01)[0] == 0
    code, _, err = himoe(["train", "--model_dir", out, "--resume", "--max_iters", 2], capsys)
    assert code == 0, err
    assert checkpoint.read_config(out)[2] == 2
    assert not verify(out)[0]


def test_upcycle_refuses_bad_input_in_one_line(dense_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    code, _, err = upcycle(tmp_path / "nothing", out, capsys)
    assert_one_line_error(code, err, "is not a directory")
    code, _, err = upcycle(dense_dir, out, capsys, "--router", "dense")
    assert_one_line_error(code, err, "--router dense makes no MoE")
    code, _, err = upcycle(dense_dir, out, capsys, "--noise", -1)
    assert_one_line_error(code, err, "--noise must be a finite number >= 0")
    code, _, err = upcycle(dense_dir, dense_dir, capsys)
    assert_one_line_error(code, err, "is --from itself")
    assert not out.exists()
    assert upcycle(dense_dir, out, capsys)[0] == 0
    code, _, err = upcycle(out, tmp_path / "again", capsys)
    assert_one_line_error(code, err, "not a dense one")
    code, _, err = upcycle(dense_dir, out, capsys)
    assert_one_line_error(code, err, "already holds a himoe model")
    code, _, err = upcycle(dense_dir, out, capsys, "--force", "--num_experts", 2)
    assert code == 0, err
    assert checkpoint.read_config(out)[0].num_experts == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = upcycle(dense_dir, other, capsys, "--force")
    assert_one_line_error(code, err, "holds other files")


@pytest.mark.slow  # two process start-ups
def test_sigkill_leaves_no_model_or_the_whole_upcycled_one(dense_dir, tmp_path, capsys):
    """`himoe upcycle` killed before its save's commit point leaves no model in --model_dir
    (a new upcycle into it works); killed after it, the next reader completes the save."""
    out = tmp_path / "moe"
    staging = out / STAGING

    def start():
        env = dict(os.environ, OMP_NUM_THREADS="1", **{atomic_dir.SLOW_SAVE_ENV: "0.02"})
        return subprocess.Popen([sys.executable, "-m", "himoe", "upcycle", "--from",
                                 str(dense_dir), "--model_dir", str(out)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    proc = start()
    wait_for(proc, lambda: staging_has_files(staging), "the save to begin")
    kill(proc)
    assert not (out / "manifest.json").exists() and not (out / "config.json").exists()
    code, _, err = himoe(["verify", "--model_dir", out], capsys)  # the reader cleans up
    assert "discarded an interrupted save" in err, err
    proc = start()
    wait_for(proc, lambda: (staging / "manifest.json").exists(), "the commit point")
    kill(proc)
    code, _, err = himoe(["verify", "--model_dir", out], capsys)
    assert code == 0 and "completed an interrupted save" in err, err
    assert checkpoint.read_config(out)[0].router == "hierarchical"
