"""Training: exact resume, schedule, parameter counts at the card's defaults."""

import dataclasses

import pytest
import torch

from himoe.checkpoint import card as checkpoint
from himoe.cli.presets import preset_values
from himoe.config import HiMoEConfig
from himoe.model import HiMoEModel
from himoe.training.optim import bias_rate_at, build_optimizer, lr_at
from himoe.training.trainer import Trainer
from tests.conftest import tiny_config


def run_cfg(tmp_path, name, **overrides):
    cfg = tiny_config(model_dir=str(tmp_path / name), max_iters=10, eval_interval=5,
                      dropout=0.1, **overrides)
    return cfg


def test_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    straight = Trainer(run_cfg(tmp_path, "a")).train()
    first = Trainer(run_cfg(tmp_path, "b")).train(stop_at=5)
    assert first.step == 5 and not (tmp_path / "b" / "sample.txt").exists()
    second = Trainer(run_cfg(tmp_path, "b"), resume=True).train()
    assert second.step == 10
    # Dropout, data order and AdamW moments all continue exactly: equal, not close.
    assert first.train_losses + second.train_losses == straight.train_losses
    a, _, _, step_a = checkpoint.load_model(tmp_path / "a")
    b, _, _, step_b = checkpoint.load_model(tmp_path / "b")
    assert step_a == step_b == 10
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    samples = [(tmp_path / d / "sample.txt").read_text() for d in ("a", "b")]
    assert samples[0] == samples[1]


def test_routers_of_both_levels_change_between_saves(tmp_path):
    model_dir = tmp_path / "r"

    def routers():
        return {str(p.relative_to(model_dir)): torch.load(p, weights_only=True)["weight"]
                for p in model_dir.rglob("*router.pt")}

    Trainer(run_cfg(tmp_path, "r")).train(stop_at=5)
    before = routers()
    Trainer(run_cfg(tmp_path, "r"), resume=True).train()
    after = routers()
    assert len(before) == 2 * (1 + 3)  # per layer: one main router, one per group
    for name in before:
        assert not torch.equal(before[name], after[name]), f"{name} did not learn"


def test_schedule_warms_up_then_decays_to_a_tenth():
    cfg = HiMoEConfig(lr=3e-4, max_iters=3000, warmup_iters=100)
    assert lr_at(0, cfg) == pytest.approx(3e-6)
    assert lr_at(99, cfg) == pytest.approx(3e-4)
    assert lr_at(100, cfg) == pytest.approx(3e-4)
    assert lr_at(1550, cfg) == pytest.approx(0.5 * (3e-4 + 3e-5))
    assert lr_at(3000, cfg) == pytest.approx(3e-5)
    values = [lr_at(s, cfg) for s in range(100, 3001, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_only_on_matrices():
    model = HiMoEModel(tiny_config())
    opt = build_optimizer(model, tiny_config())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_parameter_counts_of_the_card_preset_are_near_the_cards():
    cfg = dataclasses.replace(HiMoEConfig(), **preset_values("himoe-card", {}), vocab_size=65)
    total, active = HiMoEModel(cfg).parameter_counts()  # vocab: Hamlet's character set
    assert total == pytest.approx(52e6, rel=0.05)
    assert active == pytest.approx(1.7e6, rel=0.05)
    assert active / total == pytest.approx(0.033, abs=0.003)


def test_the_default_has_the_cards_active_parameters_and_a_quarter_of_its_total():
    card = dataclasses.replace(HiMoEConfig(), **preset_values("himoe-card", {}), vocab_size=65)
    default = dataclasses.replace(HiMoEConfig(), vocab_size=65)
    (card_total, card_active), (total, active) = (HiMoEModel(c).parameter_counts()
                                                  for c in (card, default))
    # The shared expert (512 wide) and two routed experts (256) make the card's one expert,
    # but for two more output biases of n_embd per layer; 48 routed experts of 256, against
    # the card's 96 of 1024, and the 1.1M backbone: 13.8M against 51.1M.
    assert active - card_active == 2 * default.n_embd * default.n_layer
    assert total == pytest.approx(0.27 * card_total, rel=0.01)


def test_mfu_counts_six_flops_per_active_parameter():
    from himoe.training.flops import flops_per_token, mfu

    cfg = HiMoEConfig(n_layer=2, n_embd=256, block_size=128)
    assert flops_per_token(cfg, 1_000_000) == 6e6 + 12 * 2 * 256 * 128
    assert mfu(cfg, 1_000_000, 1e6, peak=None) is None
    assert mfu(cfg, 1_000_000, 1e6, peak=1e13) == pytest.approx(flops_per_token(cfg, 1e6) / 1e7)


@pytest.mark.parametrize("scale", [1e-3, 10.0])  # under and over the limit
def test_clip_grad_norm_is_exact_and_clips_as_the_library_does(scale):
    from himoe.training.optim import clip_grad_norm

    torch.manual_seed(0)
    a = [torch.randn(64, 300, requires_grad=True), torch.randn(7, requires_grad=True),
         torch.randn(2, 3, 40, requires_grad=True)]
    for p in a:
        p.grad = torch.randn_like(p) * scale
    before = [p.grad.clone() for p in a]
    exact = torch.cat([g.double().reshape(-1) for g in before]).norm()
    norm = clip_grad_norm(a, 1.0)
    assert abs(norm.item() - exact.item()) <= 1e-6 * exact.item()
    coef = min(1.0, 1.0 / (norm.item() + 1e-6))
    for p, g in zip(a, before):
        if coef == 1.0:
            assert torch.equal(p.grad, g)  # under the limit the gradients are untouched
        else:
            torch.testing.assert_close(p.grad, g * coef, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scale", [1e-3, 10.0])
def test_clip_left_to_the_fused_step_equals_clip_then_step(scale):
    """Over the limit, the fused AdamW divides the gradients itself: the same update as
    clip_grad_norm_ then step, and the next step is not clipped again."""
    from himoe.training.optim import clip_grad_norm

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(9))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = torch.optim.AdamW(a, lr=0.1, fused=True)
    opt_b = torch.optim.AdamW(b, lr=0.1, fused=True)
    for step in range(3):
        for p, q in zip(a, b):
            p.grad = torch.randn_like(p) * scale * (step + 1)
            q.grad = p.grad.clone()
        n1 = clip_grad_norm(a, 1.0, opt_a)
        assert (getattr(opt_a, "grad_scale", None) is not None) == (scale > 1)  # only to clip
        opt_a.step()
        opt_a.grad_scale = None  # as train_step does
        n2 = torch.nn.utils.clip_grad_norm_(b, 1.0)
        opt_b.step()
        torch.testing.assert_close(n1, n2)
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_bias_rate_schedule_lr_scales_the_bias_step_by_the_learning_rates_factor(tmp_path):
    """--bias_rate_schedule lr: the loss-free bias moves by bias_update_rate * lr_at / lr,
    so in the first step of a 4-step warm-up by a quarter of the constant schedule's step."""
    cfg = HiMoEConfig(lr=3e-4, max_iters=3000, warmup_iters=100, bias_rate_schedule="lr")
    assert bias_rate_at(0, cfg) == pytest.approx(0.01)
    assert bias_rate_at(3000, cfg) == pytest.approx(0.1)
    assert bias_rate_at(3000, dataclasses.replace(cfg, bias_rate_schedule="constant")) == 1.0

    def biases_after_one_step(name, schedule):
        Trainer(run_cfg(tmp_path, name, warmup_iters=4, bias_rate_schedule=schedule)).train(
            stop_at=1)
        return {str(p.relative_to(tmp_path / name)): torch.load(p, weights_only=True)
                for p in (tmp_path / name).rglob("*main_router.pt")}

    constant, scheduled = biases_after_one_step("c", "constant"), biases_after_one_step("s", "lr")
    for file, state in constant.items():
        for key in ("group_bias_N", "expert_bias_E"):
            assert state[key].abs().max() > 0, (file, key)  # the step moved every level
            torch.testing.assert_close(scheduled[file][key], state[key] / 4)


def test_a_config_json_without_a_bias_schedule_keeps_the_constant_step_it_trained_with():
    saved = HiMoEConfig().to_dict()
    assert saved["bias_rate_schedule"] == "lr"  # today's default, recorded
    del saved["bias_rate_schedule"]  # as written before the option existed
    assert HiMoEConfig.from_dict(saved).bias_rate_schedule == "constant"


@pytest.mark.parametrize("tag,setting,marker", [("routers", "router_lr_scale", ".router."),
                                                ("experts", "expert_lr_scale", ".experts.")])
def test_lr_scale_moves_only_its_part_faster(tmp_path, tag, setting, marker):
    """One AdamW step from the same weights and batch: at scale 3 each weight of the part
    (routers, routed experts) moves 3x as far as at 1 (Adam's first step is about lr *
    sign(grad), decay aside), every other parameter exactly as far; at 1 the optimiser
    keeps its two groups, at 3 the part's weights are in groups of their own."""
    moved = {}
    for scale in (1.0, 3.0):
        trainer = Trainer(run_cfg(tmp_path, f"s{scale}", weight_decay=0.0, **{setting: scale}))
        groups = trainer.optimizer.param_groups
        own = {id(p) for group in groups if group.get(tag) for p in group["params"]}
        part = {id(p) for n, p in trainer.model.named_parameters() if marker in f".{n}"}
        if scale == 1:
            assert len(groups) == 2 and not own
        else:
            assert own == part
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train(stop_at=1)
        moved[scale] = {n: (p.detach() - before[n]).abs().sum()
                        for n, p in trainer.model.named_parameters()}
    assert any(marker in f".{name}" for name in moved[3.0])
    for name, far in moved[3.0].items():
        if marker in f".{name}":
            torch.testing.assert_close(far, 3 * moved[1.0][name], rtol=1e-3, atol=0)
        else:
            assert torch.equal(far, moved[1.0][name]), name


@pytest.mark.parametrize("setting", ["router_lr_scale", "expert_lr_scale"])
def test_resume_with_an_lr_scale_equals_an_uninterrupted_run(tmp_path, setting):
    straight = Trainer(run_cfg(tmp_path, "a", **{setting: 0.5})).train()
    Trainer(run_cfg(tmp_path, "b", **{setting: 0.5})).train(stop_at=5)
    resumed = Trainer(run_cfg(tmp_path, "b", **{setting: 0.5}), resume=True).train()
    assert straight.train_losses[5:] == resumed.train_losses


def test_resume_refuses_to_move_router_lr_scale_to_or_from_1(tmp_path):
    import argparse

    from himoe.cli.train import config_from_args
    from himoe.errors import UserError

    Trainer(run_cfg(tmp_path, "m")).train(stop_at=5)
    model_dir = str(tmp_path / "m")
    assert config_from_args(argparse.Namespace(model_dir=model_dir), True).router_lr_scale == 1
    with pytest.raises(UserError, match="--router_lr_scale 2 cannot resume a run trained at 1"):
        config_from_args(argparse.Namespace(model_dir=model_dir, router_lr_scale=2.0), True)
    # The Python API gets the same one line, not torch's error about parameter groups.
    with pytest.raises(UserError, match="--router_lr_scale 2 cannot resume a run trained at 1"):
        Trainer(run_cfg(tmp_path, "m", router_lr_scale=2.0), resume=True)
    with pytest.raises(UserError, match="--expert_lr_scale 3 cannot resume a run trained at 1"):
        Trainer(run_cfg(tmp_path, "m", expert_lr_scale=3.0), resume=True)
