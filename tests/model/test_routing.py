"""Routing losses against hand computations, and the grouped (Hi-MoE) router."""

import math

import pytest
import torch
import torch.nn.functional as F

from himoe.checkpoint import card as checkpoint
from himoe.model import GroupedRouter, HierarchicalRouter, HiMoEModel, losses
from himoe.model.routers.hierarchical import two_level_switch_loss
from tests.conftest import tiny_config

# Two tokens, four experts in two groups of two.
P = torch.tensor([[0.4, 0.3, 0.2, 0.1],
                  [0.1, 0.1, 0.2, 0.6]])
IDS = torch.tensor([[0], [3]])


def test_switch_loss_by_hand():
    # f = [1/2, 0, 0, 1/2]; P_mean = [0.25, 0.2, 0.2, 0.35]
    assert losses.switch_loss(P, IDS).item() == pytest.approx(4 * (0.5 * 0.25 + 0.5 * 0.35))


def test_z_loss_by_hand():
    z = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    want = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    assert losses.z_loss(z).item() == pytest.approx(want, rel=1e-6)


def test_hi_moe_regularisers_by_hand():
    # group masses: token 1 [0.7, 0.3], token 2 [0.2, 0.8]
    inter = ((0.49 + 0.09) + (0.04 + 0.64)) / 2
    assert losses.inter_group_reg(P, 2).item() == pytest.approx(inter)
    intra = -((0.16 + 0.09 + 0.04 + 0.01) + (0.01 + 0.01 + 0.04 + 0.36)) / 2
    assert losses.intra_group_reg(P, 2).item() == pytest.approx(intra)
    cond = -(((4 / 7) ** 2 + (3 / 7) ** 2 + (2 / 3) ** 2 + (1 / 3) ** 2)
             + (0.5 ** 2 + 0.5 ** 2 + 0.25 ** 2 + 0.75 ** 2)) / 2
    assert losses.intra_group_reg(P, 2, conditional=True).item() == pytest.approx(cond, rel=1e-6)

    def h(ps):
        return -sum(p * math.log(p) for p in ps)

    assert losses.inter_group_reg(P, 2, "entropy").item() == pytest.approx(
        -(h([0.7, 0.3]) + h([0.2, 0.8])) / 2, rel=1e-6)
    assert losses.intra_group_reg(P, 2, "entropy").item() == pytest.approx(
        (h(P[0].tolist()) + h(P[1].tolist())) / 2, rel=1e-6)


def test_two_level_switch_loss_by_hand():
    p1 = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    g = torch.tensor([[0], [1], [0]])
    p2 = torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]], [[0.2, 0.8]]])
    j = torch.tensor([[[0]], [[1]], [[1]]])
    level1 = 2 * ((2 / 3) * (1.7 / 3) + (1 / 3) * (1.3 / 3))
    # group 0: tokens 1 and 3, picks [1, 1] -> f = [.5, .5], P = [.55, .45]; group 1: token 2
    level2 = (2 / 3) * 2 * (0.5 * 0.55 + 0.5 * 0.45) + (1 / 3) * 2 * (0 * 0.5 + 1 * 0.5)
    got = two_level_switch_loss(p1, g, p2, j, torch.tensor([2.0, 2.0])).item()
    assert got == pytest.approx(level1 + level2, rel=1e-6)


def test_grouped_router_picks_top_one_in_every_group_with_scaled_weights():
    torch.manual_seed(0)
    cfg = tiny_config(router="grouped", num_moes=3, num_experts=4, top_k_experts=1)
    router = GroupedRouter(cfg).eval()
    with torch.no_grad():
        router.expert_scale_E.copy_(torch.linspace(0.5, 1.5, 12))
    x = torch.randn(10, cfg.n_embd)
    r = router(x)
    assert r.ids_TK.shape == (10, 3)
    assert torch.equal(r.ids_TK // 4, torch.arange(3).expand(10, 3))  # one per group
    pi = F.softmax(x @ router.weight_ED.t(), -1)
    best = pi.view(10, 3, 4).max(-1)
    assert torch.equal(r.ids_TK % 4, best.indices)
    want = best.values / best.values.sum(-1, keepdim=True) * router.expert_scale_E[r.ids_TK]
    torch.testing.assert_close(r.weights_TK, want)


def test_grouped_router_ema_updates_in_training_only_and_is_saved(tmp_path):
    torch.manual_seed(1)
    cfg = tiny_config(router="grouped", switch_coef=0.01, z_coef=0.001, inter_coef=0.05,
                      intra_coef=0.1)
    model = HiMoEModel(cfg)
    idx = torch.randint(0, 20, (2, 16))
    model.eval()
    model(idx)
    assert torch.all(model.blocks[0].ffn.router.logit_ema_E == 0)
    model.train()
    _, loss = model(idx, idx)
    assert set(model.aux_losses()) == {"switch", "z", "inter", "intra"}
    loss.backward()
    for moe in model.moe_layers.values():
        assert moe.router.logit_ema_E.abs().sum() > 0
        assert moe.router.weight_ED.grad.abs().sum() > 0
        assert moe.router.expert_scale_E.grad.abs().sum() > 0
    checkpoint.save_model(model, [str(i) for i in range(20)], 1, tmp_path)
    loaded, *_ = checkpoint.load_model(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_aux_terms_enter_the_training_loss_only():
    torch.manual_seed(2)
    cfg = tiny_config(switch_coef=0.5, z_coef=0.1)
    model = HiMoEModel(cfg)
    idx = torch.randint(0, 20, (2, 16))
    model.train()
    _, with_aux = model(idx, idx)
    aux = sum(model.aux_losses().values())
    logits, _ = model(idx)
    ce = F.cross_entropy(logits.view(-1, 20), idx.view(-1))
    assert with_aux.item() == pytest.approx(ce.item() + aux, rel=1e-5)
    model.eval()
    logits, plain = model(idx, idx)
    assert plain.item() == pytest.approx(F.cross_entropy(logits.view(-1, 20), idx.view(-1)).item())


def test_hierarchical_switch_gradient_reaches_both_levels():
    torch.manual_seed(3)
    router = HierarchicalRouter(tiny_config(switch_coef=1.0))
    r = router(torch.randn(50, 32))
    r.aux["switch"].backward()
    assert router.main_weight_ND.grad.abs().sum() > 0
    assert router.group_weight_NMD.grad.abs().sum() > 0
