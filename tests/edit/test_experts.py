"""`himoe experts list | swap | quantize`: single expert and router files of a saved model."""

import io
import shutil
from pathlib import Path

import pytest
import torch

from himoe import Expert
from himoe.checkpoint import card as checkpoint
from himoe.checkpoint import manifest as mf
from himoe.checkpoint.quantize import dequantize_state, quantize_rows
from himoe.checkpoint.verify import verify
from himoe.model import HiMoEModel
from himoe.training.trainer import Trainer
from tests.cli.test_bad_input import assert_one_line_error, himoe
from tests.conftest import tiny_config

EXPERT = "layer_02_moe_expert_001/model_002.pt"


def small_config(model_dir, seed=1, **overrides):
    """2 layers of 2 groups x 2 experts, n_embd 16, trained on the shipped Hamlet; the
    shared expert a quarter of the active width, which the file sizes below are worked out
    for (routed experts 24 wide, the shared one 16)."""
    base = dict(n_embd=16, n_layer=2, block_size=16, num_moes=2, num_experts=2, batch_size=2,
                max_iters=2, eval_interval=2, eval_iters=2, sample_tokens=8, seed=seed,
                shared_fraction=0.25, model_dir=str(model_dir))
    base.update(overrides)
    return tiny_config(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Two tiny trained models (seeds 1 and 2); tests work on copies."""
    root = tmp_path_factory.mktemp("experts")
    for name, seed in (("a", 1), ("b", 2)):
        Trainer(small_config(root / name, seed), out=io.StringIO()).train()
    return root


@pytest.fixture
def models(trained, tmp_path) -> tuple[Path, Path]:
    for name in ("a", "b"):
        shutil.copytree(trained / name, tmp_path / name)
    return tmp_path / "a", tmp_path / "b"


def digests(model_dir: Path) -> dict:
    return {str(p.relative_to(model_dir)): mf.sha256_file(p)
            for p in model_dir.rglob("*.pt")}


def test_list_has_one_row_per_expert_and_router_file(models, capsys):
    a, _ = models
    code, out, err = himoe(["experts", "list", "--model_dir", a, "--device", "cpu"], capsys)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.startswith("layer_")]
    # per layer: main router, shared expert, 2 x (router + 2 experts)
    assert len(rows) == 2 * (1 + 1 + 2 * (1 + 2))
    shared = [r for r in rows if r[3] == "shared"]
    # 16 -> 16 -> 16 with biases: a quarter of the active width 4 x 16; every token runs it
    assert [r[0] for r in shared] == ["layer_01_shared_expert.pt", "layer_02_shared_expert.pt"]
    assert all(r[2] == "-" and r[4] == f"{2 * 16 * 16 + 16 + 16:,}" and r[7] == "100.0%"
               for r in shared)
    # 808 = fc1 24 x 16 + 24, fc2 16 x 24 + 16: the shared expert takes a quarter of 4 x 16,
    # each of a token's two routed experts half of the rest
    experts = [r for r in rows if r[3] not in ("router", "shared")]
    assert len(experts) == 8 and all(r[4] == "808" and r[6] == "float32" for r in experts)
    for layer in ("1", "2"):  # the expert shares of a layer add up to all its tokens
        shares = [float(r[7].rstrip("%")) for r in experts if r[1] == layer]
        assert sum(shares) == pytest.approx(100.0, abs=0.3)
    sizes = {r[0]: int(r[5].replace(",", "")) for r in rows}
    assert sizes[EXPERT] == (a / EXPERT).stat().st_size
    assert "val loss" in out.splitlines()[0]


def test_swap_replaces_one_file_and_the_model_still_verifies(models, capsys):
    a, b = models
    before = digests(a)
    code, out, err = himoe(["experts", "swap", "--model_dir", a, "--from_dir", b,
                            "--part", "layer2.group1.expert2"], capsys)
    assert code == 0, err
    assert "swapped expert 2 of group 1 in layer 2" in out and "OK" in out
    after = digests(a)
    assert after[EXPERT] == mf.sha256_file(b / EXPERT)
    assert {k: v for k, v in after.items() if k != EXPERT} == \
        {k: v for k, v in before.items() if k != EXPERT}
    loaded, *_ = checkpoint.load_model(a)
    other, *_ = checkpoint.load_model(b)
    e = 0 * 2 + 1  # group 1, expert 2: flat id g * M + j
    assert torch.equal(loaded.blocks[1].ffn.experts.w1_EDF[e],
                       other.blocks[1].ffn.experts.w1_EDF[e])
    # A router, named by its path.
    code, out, err = himoe(["experts", "swap", "--model_dir", a, "--from_dir", b,
                            "--file", "layer_01_moe_expert_002/router.pt"], capsys)
    assert code == 0 and not verify(a)[0], err


def test_swap_refuses_a_file_of_another_shape(models, tmp_path, capsys):
    a, _ = models
    wide = HiMoEModel(tiny_config(n_embd=32, n_layer=2, num_moes=2, num_experts=2,
                                  shared_fraction=0.25))
    checkpoint.save_model(wide, [chr(65 + i) for i in range(20)], 1, tmp_path / "wide")
    before = digests(a)
    code, _, err = himoe(["experts", "swap", "--model_dir", a, "--from_dir", tmp_path / "wide",
                          "--file", EXPERT], capsys)
    assert_one_line_error(code, err, "has shape (48, 32) but")
    assert "(24, 16)" in err
    code, _, err = himoe(["experts", "swap", "--model_dir", a, "--from_dir", tmp_path / "wide",
                          "--part", "layer3.router"], capsys)
    assert_one_line_error(code, err, "there is no layer 3")
    code, _, err = himoe(["experts", "swap", "--model_dir", a, "--from_dir", tmp_path / "wide",
                          "--file", "backbone.pt"], capsys)
    assert_one_line_error(code, err, "is not an expert or router file")
    assert digests(a) == before


def test_quantize_shrinks_the_files_and_keeps_the_model_working(models, capsys):
    a, _ = models
    before_model, *_ = checkpoint.load_model(a)
    sizes = {rel: (a / rel).stat().st_size for rel in digests(a) if "/model_" in rel}
    code, out, err = himoe(["experts", "quantize", "--model_dir", a, "--only", "layer1.group2"],
                           capsys)
    assert code == 0 and "quantised 2 expert files" in out, err
    for group, key in ((2, "fc1.weight_int8"), (1, "fc1.weight")):
        assert key in torch.load(a / f"layer_01_moe_expert_00{group}/model_001.pt",
                                 weights_only=True)
    code, out, err = himoe(["experts", "quantize", "--model_dir", a, "--device", "cpu"], capsys)
    assert code == 0, err
    # the 6 routed experts left and both layers' shared experts
    assert "quantised 8 expert files" in out and "(2 were already int8)" in out and "OK" in out
    losses = [float(x) for x in out.split("validation loss ")[1].split(" (")[0].split(" -> ")]
    assert abs(losses[1] - losses[0]) < 0.01
    for rel, size in sizes.items():
        assert (a / rel).stat().st_size < 0.7 * size
    sd = torch.load(a / EXPERT, weights_only=True)
    assert sd["fc1.weight_int8"].dtype == torch.int8 and sd["fc1.bias"].dtype == torch.float32
    assert sd["fc2.weight_scale"].shape == (16,)  # one scale per output channel
    assert not verify(a)[0]
    loaded, *_ = checkpoint.load_model(a)
    w, q = before_model.blocks[0].ffn.experts.w1_EDF, loaded.blocks[0].ffn.experts.w1_EDF
    scale_EF = w.abs().amax(1) / 127  # the rows of fc1.weight are the columns of w1_EDF
    assert ((w - q).abs() <= scale_EF[:, None, :] / 2 + 1e-7).all()
    code, out, err = himoe(["generate", "--model_dir", a, "--max_new_tokens", "5"], capsys)
    assert code == 0, err
    code, out, err = himoe(["experts", "quantize", "--model_dir", a, "--only", "layer1.router"],
                           capsys)
    assert_one_line_error(code, err, "names no expert files")


def test_quantize_rows_round_trip():
    w_OI = torch.randn(6, 10)
    w_OI[2] = 0  # an all-zero row must not divide by zero
    q_OI, scale_O = quantize_rows(w_OI)
    back = dequantize_state({"fc1.weight_int8": q_OI, "fc1.weight_scale": scale_O})
    assert torch.allclose(back["fc1.weight"], w_OI, atol=float(scale_O.max()) / 2 + 1e-7)
    assert torch.equal(back["fc1.weight"][2], torch.zeros(10))


def test_the_shared_expert_is_a_part_of_its_own(models, capsys):
    """layerL.shared names the layer's shared expert file for swap and quantize; it loads
    into himoe.Expert on its own, as a routed expert's file does."""
    a, b = models
    rel = "layer_02_shared_expert.pt"
    before = digests(a)
    code, out, err = himoe(["experts", "swap", "--model_dir", a, "--from_dir", b,
                            "--part", "layer2.shared"], capsys)
    assert code == 0 and "swapped the shared expert in layer 2" in out, err
    after = digests(a)
    assert {k for k in after if after[k] != before.get(k)} == {rel}  # every other file: bytes
    assert after[rel] == digests(b)[rel]
    code, out, err = himoe(["experts", "quantize", "--model_dir", a, "--only", "layer2.shared"],
                           capsys)
    assert code == 0 and "quantised 1 expert files" in out, err
    assert "fc1.weight_int8" in torch.load(a / rel, weights_only=True)
    loaded, *_ = checkpoint.load_model(a)
    reference = Expert(16, 16)
    reference.load_state_dict(torch.load(b / rel, weights_only=True))
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded.blocks[1].shared_ffn(x), reference(x), atol=2e-2, rtol=0)
    code, _, err = himoe(["experts", "swap", "--model_dir", a, "--from_dir", b, "--part",
                          "layer1.group1.shared"], capsys)
    assert_one_line_error(code, err, "name it layer1.shared")
