"""A collapsed layer is never silent: one line at each evaluation and a flag in metrics.jsonl."""

import io
import json

import torch

from himoe.analysis.balance import collapse_warning, load_figures
from himoe.training.evaluation import balance_hint, flag_collapse
from himoe.training.trainer import Trainer
from tests.conftest import tiny_config


def figures(counts: list[int], groups: int = 2) -> dict:
    return load_figures(torch.tensor(counts), groups)


def test_balanced_layer_gives_no_warning():
    assert collapse_warning(1, figures([10, 11, 9, 10]), "hint") is None


def test_collapsed_layer_names_layer_busiest_expert_and_hint():
    line = collapse_warning(2, figures([0, 1, 0, 97, 0, 2], groups=3), "use --x")
    assert line.startswith("warning: layer 2 ")
    assert "moe_expert_002/model_002 takes 97%" in line and line.endswith("use --x")
    assert "3 of 6 experts dead" in line


def test_half_the_experts_dead_is_flagged_even_at_low_cv():
    fig = figures([5, 5, 5, 0, 0, 0, 5, 0], groups=2)  # CV 1.0, 4 of 8 dead: fine
    assert collapse_warning(1, fig, "h") is None
    fig = figures([5, 5, 5, 0, 0, 0, 0, 0], groups=2)
    assert collapse_warning(1, fig, "h") is not None


def test_ragged_groups_count_only_real_experts():
    # group 1 has 3 experts, group 2 only 1 (slot 4..6 empty): 4 real experts, 1 dead
    fig = load_figures(torch.tensor([4, 4, 0, 4, 0, 0]), 2, [3, 1])
    assert collapse_warning(1, fig, "h") is None
    fig = load_figures(torch.tensor([9, 0, 0, 1, 0, 0]), 2, [3, 1])
    assert "2 of 4 experts dead" in collapse_warning(1, fig, "h")


def test_flag_collapse_marks_every_layer():
    cfg = tiny_config()
    layers = [figures([10] * 12, 3), figures([120] + [0] * 11, 3)]
    warnings = flag_collapse(layers, cfg)
    assert [f["collapsed"] for f in layers] == [False, True]
    assert len(warnings) == 1 and "layer 2" in warnings[0] and "--" in warnings[0]


def test_hint_names_the_balancing_flags_the_run_leaves_off():
    hint = balance_hint(tiny_config(switch_coef=0.0, bias_update_rate=0.0))
    assert "--switch_coef 0.01" in hint and "--bias_update_rate 0.001" in hint
    assert "--shared_fraction" not in hint  # on (0.5) in this run
    hint = balance_hint(tiny_config(bias_update_rate=0.002))
    assert hint.startswith("every balancing flag is on") and "--bias_update_rate 0.002" in hint
    assert "--switch_coef" in balance_hint(tiny_config(router="topk", switch_coef=0.0))


def test_training_prints_the_warning_and_logs_the_flag(tmp_path):
    cfg = tiny_config(model_dir=str(tmp_path / "m"), max_iters=2, eval_interval=2,
                      sample_tokens=4, top_k_experts=1)  # top-1: one expert can take all
    trainer = Trainer(cfg, out=io.StringIO())
    with torch.no_grad():  # every token to group 0, expert 0 of the first MoE layer
        router = trainer.model.moe_layers[0].router
        router.main_weight_ND.zero_()
        router.group_weight_NMD.zero_()
        ln = trainer.model.blocks[0].ln2
        ln.weight.zero_()
        ln.bias.fill_(1.0)
        router.main_weight_ND[0].fill_(10.0)
        router.group_weight_NMD[0, 0].fill_(10.0)
    trainer.train(stop_at=2)
    printed = trainer.out.getvalue()
    assert "warning: layer 1 routing has collapsed" in printed
    assert "takes 100% of tokens" in printed
    ev = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ev["layers"][0]["collapsed"] is True
