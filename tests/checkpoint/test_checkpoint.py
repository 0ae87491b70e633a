"""The card's modular checkpoint: layout, bit-exact round trip, single-file use."""

import json

import pytest
import torch

from himoe import Expert
from himoe.checkpoint import card as checkpoint
from himoe.model import HiMoEModel
from tests.conftest import tiny_config


def expected_files(n_layer, N, M, shared=True):
    files = {"config.json", "backbone.pt", "manifest.json"}  # manifest.json: the commit record
    for layer in range(1, n_layer + 1):
        prefix = f"layer_{layer:02d}_" if n_layer > 1 else ""
        files.add(f"{prefix}main_router.pt")
        if shared:  # the default has a shared expert, in a file of its own
            files.add(f"{prefix}shared_expert.pt")
        for g in range(1, N + 1):
            files.add(f"{prefix}moe_expert_{g:03d}/router.pt")
            files |= {f"{prefix}moe_expert_{g:03d}/model_{j:03d}.pt" for j in range(1, M + 1)}
    return files


def saved(model, tmp_path, vocab=None):
    vocab = vocab or [chr(65 + i) for i in range(model.cfg.vocab_size)]
    checkpoint.save_model(model, vocab, 7, tmp_path)
    return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("n_layer", [1, 2])
def test_layout_is_the_cards(n_layer, tmp_path):
    model = HiMoEModel(tiny_config(n_layer=n_layer))
    assert saved(model, tmp_path) == expected_files(n_layer, 3, 4)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["step"] == 7 and len(meta["vocab"]) == 20
    assert meta["config"]["n_layer"] == n_layer
    for path in tmp_path.rglob("*.pt"):
        sd = torch.load(path, weights_only=True)
        assert isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())


@pytest.mark.parametrize("shared_fraction", [0.0, 0.5])
def test_round_trip_is_bit_exact(shared_fraction, tmp_path):
    torch.manual_seed(0)
    model = HiMoEModel(tiny_config(shared_fraction=shared_fraction))
    assert saved(model, tmp_path) == expected_files(2, 3, 4, shared=shared_fraction > 0)
    loaded, cfg, vocab, step = checkpoint.load_model(tmp_path)
    assert step == 7 and cfg.model == model.cfg
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # tying survives loading


def test_each_file_holds_only_its_own_weights(tmp_path):
    model = HiMoEModel(tiny_config())
    saved(model, tmp_path)
    expert = tmp_path / "layer_01_moe_expert_001" / "model_001.pt"
    per_expert = sum(p.numel() for p in model.blocks[0].ffn.experts.parameters()) // 12
    assert expert.stat().st_size < 4 * per_expert + 4096  # not the whole stacked storage


def test_one_expert_file_loads_on_its_own_and_computes_what_the_model_does(tmp_path):
    torch.manual_seed(1)
    model = HiMoEModel(tiny_config())
    saved(model, tmp_path)
    cfg = model.cfg
    g, j = 1, 2  # moe_expert_002/model_003.pt, flat id g * M + j
    expert = Expert(cfg.n_embd, cfg.ffn_hidden)
    expert.load_state_dict(torch.load(tmp_path / "layer_02_moe_expert_002" / "model_003.pt",
                                      weights_only=True))
    x = torch.randn(5, cfg.n_embd)
    bank = model.blocks[1].ffn.experts
    e = g * cfg.num_experts + j
    ids = torch.full((5, 1), e)
    torch.testing.assert_close(expert(x), bank(x, ids, torch.ones(5, 1)), atol=1e-6, rtol=1e-5)


def test_a_replaced_router_file_is_used_on_the_next_load(tmp_path):
    torch.manual_seed(2)
    saved(HiMoEModel(tiny_config()), tmp_path)
    new_router = torch.nn.Linear(32, 4, bias=False)  # M=4 experts, D=32: same shape
    path = tmp_path / "layer_01_moe_expert_003" / "router.pt"
    torch.save(new_router.state_dict(), path)
    loaded, *_ = checkpoint.load_model(tmp_path)
    assert torch.equal(loaded.blocks[0].ffn.router.group_weight_NMD[2], new_router.weight)


def test_dense_baseline_saves_only_a_backbone(tmp_path):
    model = HiMoEModel(tiny_config(router="dense"))
    assert saved(model, tmp_path) == {"config.json", "backbone.pt", "manifest.json"}
    loaded, *_ = checkpoint.load_model(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


@pytest.mark.parametrize("router", ["hierarchical", "grouped", "topk", "group_limited", "dense"])
def test_parameter_estimate_counts_what_the_model_allocates(router):
    cfg = tiny_config(router=router, n_layer=3, expert_hidden=24)
    assert cfg.parameter_estimate() == sum(p.numel() for p in HiMoEModel(cfg).parameters())
