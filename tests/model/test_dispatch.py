"""The MoE layer against naive references: per-token loop, dense FFN, router gradients."""

import pytest
import torch
import torch.nn.functional as F

from himoe.model import DenseFFN, HiMoEModel, MoELayer
from himoe.model.experts import ExpertBank, grouped_mm_supported, segment_linear, segments_of
from tests.conftest import tiny_config


def naive_experts(bank: ExpertBank, x_TD, ids_TK, weights_TK):
    """One token, one expert at a time: the definition the fast path must match."""
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        for e, w in zip(ids_TK[t].tolist(), weights_TK[t]):
            h = F.gelu(x_TD[t] @ bank.w1_EDF[e] + bank.b1_EF[e])
            y = y + w * (h @ bank.w2_EFD[e] + bank.b2_ED[e])
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("k, drop_rate", [(1, 0.0), (3, 0.0), (1, 0.3), (2, 0.3)])
def test_dispatch_matches_per_token_reference_forward_and_backward(k, drop_rate):
    """Dropped slots (id -1, over capacity) add nothing and pass no gradient."""
    torch.manual_seed(0)
    E, D, T = 6, 16, 40
    bank = ExpertBank(E, D, 32, n_layer=1)
    with torch.no_grad():  # nonzero biases so that a bias bug would show
        bank.b1_EF.normal_()
        bank.b2_ED.normal_()
    x = torch.randn(T, D, requires_grad=True)
    ids = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)])  # expert E-1 idle
    drop = torch.rand(T, k) < drop_rate
    weights = torch.rand(T, k, requires_grad=True)
    out = bank(x, ids.masked_fill(drop, -1), weights, n_dropped=int(drop.sum()))
    ref = naive_experts(bank, x, ids, weights * ~drop)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, weights, *bank.parameters()], grad_out)
    want = torch.autograd.grad(ref, [x, weights, *bank.parameters()], grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert torch.all(got[2][E - 1] == 0)  # the idle expert's w1 gradient: zero, not none
    assert torch.all(got[1][drop] == 0)  # a dropped slot's weight gets no gradient


def test_grouped_mm_paths_equal_the_loop_forward_and_backward():
    """The GPU path (grouped_mm and its own backward), the CPU path with grouped_mm for the
    forward and input gradient, and the CPU path's per-expert loop: the same values."""
    if not grouped_mm_supported("cpu", torch.float32):
        pytest.skip("grouped_mm not available in this torch build")
    torch.manual_seed(1)
    x = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(4, 16, 8, requires_grad=True)
    b = torch.randn(4, 8, requires_grad=True)
    counts = torch.tensor([3, 0, 7, 0])  # two experts receive no tokens
    segments = segments_of(counts.tolist())
    offs = counts.cumsum(0).to(torch.int32)
    results = []
    for offs_E, segs in ((offs, None), (offs, segments), (None, segments)):
        y = segment_linear(x, w, b, counts, offs_E, segs)
        results.append((y, *torch.autograd.grad(y.square().sum(), [x, w, b])))
    for variant in results[:2]:
        for got, want in zip(variant, results[2]):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert torch.all(results[1][2][[1, 3]] == 0) and torch.all(results[2][2][[1, 3]] == 0)


def test_one_group_of_one_expert_is_a_dense_ffn():
    torch.manual_seed(2)
    cfg = tiny_config(num_moes=1, num_experts=1, top_k_experts=1)
    moe = MoELayer(cfg)
    dense = DenseFFN(cfg.n_embd, cfg.ffn_hidden)
    with torch.no_grad():
        dense.fc1.weight.copy_(moe.experts.w1_EDF[0].t())
        dense.fc1.bias.copy_(moe.experts.b1_EF[0])
        dense.fc2.weight.copy_(moe.experts.w2_EFD[0].t())
        dense.fc2.bias.copy_(moe.experts.b2_ED[0])
    x = torch.randn(3, 5, cfg.n_embd)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-6, rtol=1e-5)


def test_whole_model_with_one_expert_equals_dense_model():
    torch.manual_seed(3)
    # No shared expert: the one routed expert is then the whole FFN, as in the dense model.
    moe_model = HiMoEModel(tiny_config(num_moes=1, num_experts=1, top_k_experts=1,
                                     shared_fraction=0.0)).eval()
    dense_model = HiMoEModel(tiny_config(num_moes=1, num_experts=1, top_k_experts=1,
                                       router="dense")).eval()
    state = {k: v for k, v in moe_model.state_dict().items() if ".ffn." not in k}
    for i, block in enumerate(moe_model.blocks):
        bank = block.ffn.experts
        state[f"blocks.{i}.ffn.fc1.weight"] = bank.w1_EDF[0].t()
        state[f"blocks.{i}.ffn.fc1.bias"] = bank.b1_EF[0]
        state[f"blocks.{i}.ffn.fc2.weight"] = bank.w2_EFD[0].t()
        state[f"blocks.{i}.ffn.fc2.bias"] = bank.b2_ED[0]
    dense_model.load_state_dict(state)
    idx = torch.randint(0, 20, (2, 12))
    torch.testing.assert_close(moe_model(idx)[0], dense_model(idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kg,ke", [(1, 1), (2, 2)])
def test_both_routers_of_every_layer_get_gradient(kg, ke):
    torch.manual_seed(4)
    model = HiMoEModel(tiny_config(top_k_groups=kg, top_k_experts=ke, n_layer=3))
    idx = torch.randint(0, 20, (4, 16))
    _, loss = model(idx, idx.roll(-1, dims=1))
    loss.backward()
    assert len(model.moe_layers) == 3
    for moe in model.moe_layers.values():
        assert moe.router.main_weight_ND.grad.abs().sum() > 0
        assert moe.router.group_weight_NMD.grad.abs().sum() > 0


@pytest.mark.parametrize("kg,ke", [(1, 1), (2, 1), (2, 3)])
def test_router_ids_and_weights_follow_the_formula(kg, ke):
    torch.manual_seed(5)
    cfg = tiny_config(top_k_groups=kg, top_k_experts=ke)
    router = MoELayer(cfg).router
    x = torch.randn(30, cfg.n_embd)
    r = router(x)
    N, M = cfg.num_moes, cfg.num_experts
    assert r.ids_TK.shape == (30, kg * ke)
    assert r.ids_TK.min() >= 0 and r.ids_TK.max() < N * M
    p1 = F.softmax(x @ router.main_weight_ND.t(), -1)
    for t in range(30):
        groups = (r.ids_TK[t] // M).tolist()
        assert set(groups) == set(p1[t].topk(kg).indices.tolist())
        for e, w in zip(r.ids_TK[t].tolist(), r.weights_TK[t]):
            g, j = divmod(e, M)
            p2 = F.softmax(x[t] @ router.group_weight_NMD[g].t(), -1)
            assert p2[j] >= p2.topk(ke).values[-1] - 1e-7  # j is among its group's top ke
            torch.testing.assert_close(w, p1[t, g] * p2[j])


def test_capacity_keeps_the_highest_weights_and_reports_drops():
    from himoe.model.moe import apply_capacity

    torch.manual_seed(6)
    T, K, E = 64, 2, 4
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    ids[:40, 0] = 0  # expert 0 is oversubscribed
    weights = torch.rand(T, K)
    kept = apply_capacity(ids, weights, E, capacity_factor=1.0)
    capacity = T * K // E
    for e in range(E):
        mine = ids == e
        survivors = kept[mine]
        assert (survivors == e).sum() == min(int(mine.sum()), capacity)
        if mine.sum() > capacity:  # every kept weight >= every dropped weight
            kept_w, dropped_w = weights[mine & (kept == e)], weights[mine & (kept < 0)]
            assert kept_w.min() >= dropped_w.max()
    # The layer: a dropped assignment contributes nothing, the rest are unchanged.
    moe = MoELayer(tiny_config(capacity_factor=0.5))
    x = torch.randn(2, 16, 32)
    y = moe(x)
    assert moe.last_dropped > 0
    routing = moe.router(x.view(-1, 32))
    ids_kept = apply_capacity(routing.ids_TK, routing.weights_TK, 12, 0.5)
    ref = naive_experts(moe.experts, x.view(-1, 32), ids_kept.clamp(min=0),
                        routing.weights_TK * (ids_kept >= 0))
    torch.testing.assert_close(y.view(-1, 32), ref, atol=1e-5, rtol=1e-5)


def test_dispatch_with_several_experts_per_token_is_bitwise_repeatable():
    torch.manual_seed(7)
    bank = ExpertBank(8, 16, 32, n_layer=1)
    x = torch.randn(256, 16)
    ids = torch.stack([torch.randperm(8)[:4] for _ in range(256)])
    weights = torch.rand(256, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # parallel accumulation is where run-to-run drift comes from
    try:
        outs = [bank(x, ids, weights) for _ in range(5)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
