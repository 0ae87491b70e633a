"""Every router: valid ids and weights, gradient to its parameters; loss-free balancing;
presets."""

import dataclasses
import io

import pytest
import torch
import torch.nn.functional as F

from himoe.analysis.balance import load_figures
from himoe.checkpoint import card as checkpoint
from himoe.cli.presets import PRESETS, preset_values
from himoe.config import HiMoEConfig
from himoe.model import HiMoEModel, losses
from himoe.model.routers.flat import GroupLimitedRouter, TopKRouter
from himoe.model.routers.registry import build_router
from himoe.training.trainer import Trainer
from tests.conftest import tiny_config

ROUTER_CONFIGS = {
    "hierarchical": dict(top_k_groups=2, top_k_experts=2),
    "grouped": dict(top_k_experts=2),
    "topk": dict(top_k_experts=3),
    "group_limited": dict(top_k_groups=2, top_k_experts=3),
}


@pytest.mark.parametrize("router", sorted(ROUTER_CONFIGS))
def test_every_router_gives_valid_ids_weights_and_gradient(router):
    torch.manual_seed(0)
    cfg = tiny_config(router=router, switch_coef=0.01, z_coef=0.001, **ROUTER_CONFIGS[router])
    r = build_router(cfg)
    x = torch.randn(40, cfg.n_embd)
    out = r(x)
    k = cfg.experts_per_token
    assert out.ids_TK.shape == out.weights_TK.shape == (40, k)
    assert out.ids_TK.min() >= 0 and out.ids_TK.max() < cfg.total_experts
    assert all(len(set(row)) == k for row in out.ids_TK.tolist())  # no expert twice
    assert torch.all(out.weights_TK > 0)
    loss = out.weights_TK.square().sum() + sum(out.aux.values())
    loss.backward()
    for name, p in r.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_topk_renormalisation_switch():
    torch.manual_seed(1)
    x = torch.randn(20, 32)
    raw = TopKRouter(tiny_config(router="topk", top_k_experts=3))
    norm = TopKRouter(tiny_config(router="topk", top_k_experts=3, renormalize=True))
    norm.load_state_dict(raw.state_dict())
    p = F.softmax(x @ raw.weight_ED.t(), -1)
    a, b = raw(x), norm(x)
    assert torch.equal(a.ids_TK, b.ids_TK)
    torch.testing.assert_close(a.weights_TK, p.topk(3).values)  # OLMoE: raw probabilities
    torch.testing.assert_close(b.weights_TK.sum(-1), torch.ones(20))


def test_group_limited_picks_only_inside_the_best_groups():
    torch.manual_seed(2)
    cfg = tiny_config(router="group_limited", num_moes=4, num_experts=3, top_k_groups=2,
                      top_k_experts=2)
    r = GroupLimitedRouter(cfg)
    x = torch.randn(30, cfg.n_embd)
    ids = r(x).ids_TK
    p = F.softmax(x @ r.weight_ED.t(), -1).view(30, 4, 3)
    best_groups = p.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    for t in range(30):
        assert set((ids[t] // 3).tolist()) <= set(best_groups[t].tolist())
        allowed = p[t][best_groups[t]].flatten()
        chosen = p[t].flatten()[ids[t]].sort().values
        assert torch.allclose(chosen, allowed.topk(2).values.sort().values)


@pytest.mark.parametrize("router", ["topk", "hierarchical"])
def test_loss_free_bias_balances_a_skewed_router(router):
    """No gradient at all: only the bias update acts, and the load evens out."""
    torch.manual_seed(3)
    cfg = tiny_config(router=router, num_moes=2, num_experts=4, top_k_experts=1,
                      bias_update_rate=1e-2)
    r = build_router(cfg).train()
    x = torch.randn(512, cfg.n_embd)
    x[:, 0] += 1.0  # strong enough to skew, weak enough that tokens still differ
    with torch.no_grad():  # skew: along x's first feature, low-numbered experts win
        for p in r.parameters():
            n = p.shape[-2]
            p[..., 0] = torch.linspace(1.0, -1.0, n).view(*([1] * (p.dim() - 2)), n)

    def cv():
        return load_figures(torch.bincount(r(x).ids_TK.flatten(), minlength=8), 2)["expert_cv"]

    before = cv()
    for _ in range(300):
        r(x)
        r.update_balance_bias()
    after = cv()
    assert before > 1.5 and after < 0.4
    # The bias changes the choice, never the weights: a chosen expert's weight is its prob.
    out = r(x)
    if router == "topk":
        p = F.softmax(x @ r.weight_ED.t(), -1)
        torch.testing.assert_close(out.weights_TK, p.gather(1, out.ids_TK))


def test_balancing_bias_never_routes_to_an_empty_slot_of_a_smaller_group():
    # After `himoe experts add` a group has fewer experts than slots. Its real experts'
    # centred biases go negative; an empty slot's stays 0 and must still never be chosen.
    cfg = tiny_config(num_moes=2, num_experts=3, top_k_experts=2, group_experts=[[2, 3]] * 2,
                      bias_update_rate=1e-3)
    r = build_router(cfg).eval()
    with torch.no_grad():
        r.expert_bias_E.copy_(torch.tensor([-0.5, -0.5, 0.0, -0.5, -0.5, 1.0]))
    ids_TK = r(torch.randn(256, cfg.n_embd, generator=torch.Generator().manual_seed(0))).ids_TK
    assert 2 not in ids_TK.unique().tolist()  # group 1's third slot is empty


def test_two_level_switch_loss_balances_a_skewed_router():
    """Only the Switch loss trains the router (no language-model loss): the load evens out
    at both levels."""
    torch.manual_seed(3)
    cfg = tiny_config(num_moes=2, num_experts=4, top_k_experts=1, switch_coef=1.0)
    r = build_router(cfg).train()
    x = torch.randn(512, cfg.n_embd)
    x[:, 0] += 1.0
    with torch.no_grad():  # the same skew as above: low-numbered groups and experts win
        for p in r.parameters():
            n = p.shape[-2]
            p[..., 0] = torch.linspace(1.0, -1.0, n).view(*([1] * (p.dim() - 2)), n)

    def figures():
        return load_figures(torch.bincount(r(x).ids_TK.flatten(), minlength=8), 2)

    before = figures()
    opt = torch.optim.Adam(r.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        r(x).aux["switch"].backward()
        opt.step()
    after = figures()
    assert before["expert_cv"] > 1.5 and after["expert_cv"] < 0.4
    assert after["group_cv"] < before["group_cv"] and after["dead_experts"] == 0


@pytest.mark.parametrize("balancer", ["switch", "bias"])
def test_group_shares_are_the_level_1_balance_target(balancer):
    """With group_shares (a merged model's domains of unequal size) both balancers move
    the group load to those shares, not to equal ones."""
    torch.manual_seed(3)
    cfg = tiny_config(num_moes=2, num_experts=4, top_k_experts=1, group_shares=[0.8, 0.2],
                      switch_coef=1.0 if balancer == "switch" else 0.0,
                      bias_update_rate=1e-2 if balancer == "bias" else 0.0)
    r = build_router(cfg).train()
    x = torch.randn(1024, cfg.n_embd)
    x[:, 0] += 1.0
    with torch.no_grad():  # skewed the other way: group 1 takes most tokens
        r.main_weight_ND[:, 0] = torch.tensor([-1.0, 1.0])

    def group_1_share():
        return float((r(x).ids_TK[:, 0] >= 4).float().mean())

    assert group_1_share() > 0.6
    opt = torch.optim.Adam(r.parameters(), lr=0.05)
    for _ in range(300):
        out = r(x)
        if balancer == "switch":
            opt.zero_grad()
            out.aux["switch"].backward()
            opt.step()
        else:
            r.update_balance_bias()
    assert group_1_share() == pytest.approx(0.2, abs=0.05)


def test_switch_loss_with_equal_targets_is_the_plain_one():
    probs_TE = torch.softmax(torch.randn(64, 5), -1)
    ids_TK = probs_TE.topk(2, -1).indices
    torch.testing.assert_close(losses.switch_loss(probs_TE, ids_TK, torch.full((5,), 0.2)),
                               losses.switch_loss(probs_TE, ids_TK))


def test_sequence_switch_loss_is_the_switch_loss_of_each_sequence_averaged():
    torch.manual_seed(0)
    p_TE = F.softmax(torch.randn(6 * 5, 8), -1)
    ids_TK = torch.randint(0, 8, (6 * 5, 2))
    naive = torch.stack([losses.switch_loss(p_TE[s:s + 5], ids_TK[s:s + 5])
                         for s in range(0, 30, 5)]).mean()
    torch.testing.assert_close(losses.sequence_switch_loss(p_TE, ids_TK, 5), naive)


def test_sequence_switch_loss_spreads_each_sequence_over_experts():
    """Sequences whose tokens all look alike. The batch-wide Switch loss balances them by
    sending each whole sequence to its own expert; the sequence-wise loss spreads every
    sequence over several."""
    cfg = tiny_config(num_moes=2, num_experts=4, top_k_experts=1, switch_coef=1.0,
                      seq_switch_coef=1.0)
    L = 32
    torch.manual_seed(4)
    x_TD = (3 * torch.randn(16, 1, cfg.n_embd) + 0.3 * torch.randn(16, L, cfg.n_embd)).view(
        -1, cfg.n_embd)

    def experts_per_sequence(loss: str) -> tuple[float, float]:
        torch.manual_seed(4)
        r = build_router(cfg).train()

        def count():
            ids_SL = r(x_TD, seq_len=L).ids_TK.view(16, L)
            return sum(len(row.unique()) for row in ids_SL) / 16

        before = count()
        opt = torch.optim.Adam(r.parameters(), lr=0.05)
        for _ in range(100):
            opt.zero_grad()
            r(x_TD, seq_len=L).aux[loss].backward()
            opt.step()
        return before, count()

    before, batch_wide = experts_per_sequence("switch")
    _, sequence_wise = experts_per_sequence("seq_switch")
    assert before < 2 and batch_wide < 2 and sequence_wise > 4


def test_router_jitter_flips_near_ties_in_training_only():
    """Jitter moves the choice of tokens that are near a tie between two groups, in training;
    tokens far from any tie, and evaluation, keep their choice."""
    torch.manual_seed(5)
    cfg = tiny_config(router_jitter=0.05)
    r = build_router(cfg)
    x_TD = torch.randn(4096, cfg.n_embd)
    top2_T2 = F.softmax(x_TD @ r.main_weight_ND.t(), -1).topk(2, dim=-1).values
    margin_T = top2_T2[:, 0] - top2_T2[:, 1]
    near, far = margin_T < 1e-3, margin_T > 0.1
    r.eval()
    reference = r(x_TD).ids_TK
    plain = build_router(dataclasses.replace(cfg, router_jitter=0.0))
    plain.load_state_dict(r.state_dict())
    assert torch.equal(plain.eval()(x_TD).ids_TK, reference)
    r.train()
    flipped_T = torch.zeros(len(x_TD), dtype=torch.bool)
    for _ in range(20):
        flipped_T |= r(x_TD).ids_TK[:, 0] // cfg.num_experts != reference[:, 0] // cfg.num_experts
    assert near.sum() >= 5 and flipped_T[near].float().mean() > 0.5
    assert not flipped_T[far].any()
    assert torch.equal(r.eval()(x_TD).ids_TK, reference)


def test_stay_probability_matches_redrawing_the_noise():
    """Shazeer's smooth load estimate against its definition: redraw one choice's noise many
    times, the others' noisy logits fixed, and count how often it is in the top k."""
    gen = torch.Generator().manual_seed(6)
    std, k, draws = 0.7, 2, 20000
    clean_TC = torch.randn(3, 5, generator=gen)
    clean_TC[2, 4] = float("-inf")  # an empty slot
    noisy_TC = clean_TC + std * torch.randn(3, 5, generator=gen)
    got = losses.stay_probability(clean_TC, noisy_TC, k, std)
    for t in range(3):
        for c in range(5):
            trials = noisy_TC[t].repeat(draws, 1)
            trials[:, c] = clean_TC[t, c] + std * torch.randn(draws, generator=gen)
            stays = (trials.topk(k, dim=-1).indices == c).any(-1).float().mean()
            assert abs(float(got[t, c]) - float(stays)) < 0.015, (t, c)
    assert got[2, 4] == 0
    assert torch.equal(losses.stay_probability(clean_TC[:, :2], noisy_TC[:, :2], 2, std),
                       torch.ones(3, 2))  # k of k choices: always in


@pytest.mark.parametrize("loss", ["importance", "load"])
def test_shazeer_losses_balance_a_skewed_router(loss):
    """Only Shazeer et al.'s importance or load loss trains the router, under noisy gating:
    the load evens out over experts and groups."""
    torch.manual_seed(3)
    cfg = tiny_config(num_moes=2, num_experts=4, top_k_experts=1, switch_coef=0.0,
                      bias_update_rate=0.0, noisy_gating=0.3, **{f"{loss}_coef": 1.0})
    r = build_router(cfg).train()
    x = torch.randn(512, cfg.n_embd)
    x[:, 0] += 1.0
    with torch.no_grad():  # low-numbered groups and experts win
        for p in r.parameters():
            n = p.shape[-2]
            p[..., 0] = torch.linspace(1.0, -1.0, n).view(*([1] * (p.dim() - 2)), n)

    def figures():
        return load_figures(torch.bincount(r.eval()(x).ids_TK.flatten(), minlength=8), 2)

    before = figures()
    opt = torch.optim.Adam(r.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        r.train()(x).aux[loss].backward()
        opt.step()
    after = figures()
    assert before["expert_cv"] > 1.5 and after["expert_cv"] < 0.5
    assert after["group_cv"] < before["group_cv"] and after["dead_experts"] == 0


def test_noisy_gating_with_zero_gates_spreads_tokens_and_keeps_clean_weights():
    """Zero-initialised gates give every logit 0: evaluation sends every token to the same
    experts, noisy gating in training spreads them over all of them, and the combine weights
    are the clean ones (1/N * 1/M) either way."""
    cfg = tiny_config(num_moes=2, num_experts=4, top_k_experts=1, zero_router_init=True,
                      noisy_gating=1.0)
    r = build_router(cfg)
    assert not any(p.any() for p in r.parameters())
    x = torch.randn(256, cfg.n_embd)
    evaluated, trained = r.eval()(x), r.train()(x)
    assert evaluated.ids_TK.unique().numel() == 1
    assert torch.bincount(trained.ids_TK.flatten(), minlength=8).min() > 0
    for routing in (evaluated, trained):
        torch.testing.assert_close(routing.weights_TK, torch.full((256, 1), 1 / 8))


@pytest.mark.slow  # seconds of whole training runs
def test_a_tiny_default_run_keeps_every_expert_alive(tmp_path):
    text = "".join(chr(97 + (i * 7 + i // 13) % 26) + " ,.\n"[i % 4] for i in range(6000))
    (tmp_path / "corpus.txt").write_text(text)
    # 300 steps and 32 evaluation batches: at 150 and 8 this toy's load CV ranged 0.2-0.74
    # over seeds, for the quarter-width shared expert as for the half-width default.
    cfg = tiny_config(max_iters=300, eval_interval=300, eval_iters=32, batch_size=8,
                      data_file=str(tmp_path / "corpus.txt"), model_dir=str(tmp_path / "m"),
                      sample_tokens=4)
    assert cfg.switch_coef > 0 and cfg.shared_hidden > 0  # the defaults under test
    ev = Trainer(cfg, out=io.StringIO()).train().evals[-1]
    for layer in ev["layers"]:
        assert layer["dead_experts"] == 0 and layer["expert_cv"] < 0.5, layer["expert_cv"]


def test_loss_free_bias_is_saved_with_the_router(tmp_path):
    torch.manual_seed(4)
    model = HiMoEModel(tiny_config(bias_update_rate=1e-2))
    with torch.no_grad():
        for moe in model.moe_layers.values():
            moe.router.group_bias_N.normal_()
            moe.router.expert_bias_E.normal_()
    checkpoint.save_model(model, [str(i) for i in range(20)], 3, tmp_path)
    sd = torch.load(tmp_path / "layer_01_moe_expert_002" / "router.pt", weights_only=True)
    assert set(sd) == {"weight", "balance_bias"}
    loaded, *_ = checkpoint.load_model(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_himoe_preset_is_the_default_model():
    values = preset_values("himoe", {})
    cfg = dataclasses.replace(HiMoEConfig(), **values)
    assert dataclasses.replace(cfg, preset="") == HiMoEConfig()
    torch.manual_seed(5)
    a = HiMoEModel(dataclasses.replace(cfg, vocab_size=20, n_embd=32))
    torch.manual_seed(5)
    b = HiMoEModel(HiMoEConfig(vocab_size=20, n_embd=32))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_card_preset_is_the_cards_literal_routing():
    cfg = dataclasses.replace(HiMoEConfig(), **preset_values("himoe-card", {})).validate()
    assert (cfg.router, cfg.top_k_groups, cfg.top_k_experts) == ("hierarchical", 1, 1)
    assert cfg.shared_hidden == 0 and cfg.ffn_hidden == 4 * cfg.n_embd  # one full expert
    assert not (cfg.switch_coef or cfg.z_coef or cfg.bias_update_rate or cfg.inter_coef
                or cfg.intra_coef or cfg.capacity_factor)
    assert cfg.dropout == 0.1 != HiMoEConfig().dropout  # the card's, not himoe's default


def test_dense_baseline_ignores_the_shared_expert():
    cfg = HiMoEConfig(router="dense").validate()  # with the default shared_fraction
    assert cfg.shared_hidden == 0 and cfg.ffn_hidden == 4 * cfg.n_embd
    assert HiMoEModel(dataclasses.replace(cfg, vocab_size=20)).blocks[0].shared_ffn is None


def test_a_config_from_before_shared_experts_has_none():
    old = HiMoEConfig().to_dict()
    del old["shared_fraction"]
    assert HiMoEConfig.from_dict(old).shared_hidden == 0


def test_k_experts_split_the_routed_width_unless_it_is_given():
    # With or without a preset: the shared expert plus a token's k experts are 4 * n_embd.
    for k, shared in [(1, 0.0), (2, 0.25), (4, 0.5)]:
        cfg = HiMoEConfig(top_k_experts=k, shared_fraction=shared).validate()
        assert cfg.shared_hidden + k * cfg.ffn_hidden == 4 * cfg.n_embd
    assert HiMoEConfig(top_k_experts=2, expert_hidden=100).ffn_hidden == 100


def test_a_format_1_config_keeps_its_full_width_experts():
    # Format 1 read expert_hidden 0 as all the shared expert leaves, for any k.
    old = dataclasses.replace(HiMoEConfig(), top_k_experts=2, shared_fraction=0.5).to_dict()
    assert old["expert_hidden"] == 0
    assert HiMoEConfig.from_dict(old).read_as_format(1).ffn_hidden == 2 * 256
    assert HiMoEConfig.from_dict(old).read_as_format(2).ffn_hidden == 256
    card = HiMoEConfig.from_dict({**old, "top_k_experts": 1}).read_as_format(1)
    assert card.expert_hidden == 0 and card.ffn_hidden == 512  # k = 1: the same either way


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_trains_a_step_with_the_cards_active_parameters(name):
    torch.manual_seed(6)
    # n_embd 96: 4 * 96 divides into 2, 6 and 8 expert widths that are multiples of 8.
    cfg = dataclasses.replace(HiMoEConfig(), **preset_values(name, {"n_embd": 96, "n_head": 2}),
                              vocab_size=20, block_size=16)
    model = HiMoEModel(cfg.validate())
    # The expert width each token runs through is the card's one 4 * n_embd expert.
    assert cfg.experts_per_token * cfg.ffn_hidden + cfg.shared_hidden == 4 * 96
    idx = torch.randint(0, 20, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)


def test_the_two_stage_schedule_is_stated():
    from himoe.training.outputs import routing_schedule

    cfg = dataclasses.replace(HiMoEConfig(), **preset_values("hi-moe", {}))
    text = routing_schedule(cfg)
    assert "stage 1" in text and "logit-EMA" in text
    assert "R_intra 0.1, ramped in over steps 0-100" in text and "Switch 0.01" in text
    card = dataclasses.replace(HiMoEConfig(), **preset_values("himoe-card", {}))
    assert routing_schedule(card) == ""  # the card: nothing to state
