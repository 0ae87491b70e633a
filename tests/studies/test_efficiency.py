"""benchmarks/efficiency.py: the figures from curves that are straight in log steps, where
piecewise interpolation is exact, and the three steps end to end on a tiny model."""

import json
import math

import pytest

from tests.conftest import load_benchmark


def efficiency():
    return load_benchmark("efficiency")


def straight(a: float, b: float, steps: list[int]) -> dict[int, float]:
    """loss(n) = a - b ln n at each grid point."""
    return {n: a - b * math.log(n) for n in steps}


def test_figures_match_the_closed_form_of_straight_curves():
    eff = efficiency()
    # The default sits 0.2 below dense at every length: it reaches dense's loss in
    # exp(-0.2 / 0.5) of the steps, and dense needs exp(0.4) times the steps to match it.
    default = straight(3.0, 0.5, [500, 1000, 2000, 3000, 6000, 9000])
    dense = straight(3.2, 0.5, [1000, 3000, 6000, 12000])
    ratio = 1.3
    fig = eff.figures(default, dense, ratio, [3000, 12000])
    gain = math.exp(0.2 / 0.5)
    assert fig["default_steps_to_dense_0"] == pytest.approx(3000 / gain)
    assert fig["time_to_dense_quality"] == pytest.approx(gain / ratio)
    assert fig["default_steps_to_dense_1"] == pytest.approx(12000 / gain)
    assert fig["time_to_dense_quality_12k"] == pytest.approx(gain / ratio)
    assert fig["compute_multiplier"] == pytest.approx(gain)
    assert fig["default_loss_at_equal_time"] == pytest.approx(3.0 - 0.5 * math.log(3000 / ratio))
    assert fig["loss_gain_at_equal_time"] == pytest.approx(
        dense[3000] - fig["default_loss_at_equal_time"])


def test_outside_the_grid_gives_a_bound_not_a_number():
    eff = efficiency()
    default = straight(3.0, 0.5, [1000, 2000, 3000])
    dense = straight(4.0, 0.5, [3000, 6000, 12000])  # a whole nat behind
    fig = eff.figures(default, dense, 1.25, [3000, 12000])
    # Dense's 3,000-step loss is passed before the default's first run ends: faster than
    # 3000 / (1000 * 1.25); dense's 12,000 steps never match the default's 3,000.
    assert fig["time_to_dense_quality"] is None
    assert fig["time_to_dense_quality_bound"] == "> 2.40"
    assert fig["compute_multiplier"] is None
    assert fig["compute_multiplier_bound"] == "> 4.00"
    behind = eff.figures(dense, default, 1.25, [3000, 12000])  # the sides swapped
    assert behind["time_to_dense_quality_bound"] == "< 0.20"  # not reached by 12,000
    assert behind["compute_multiplier_bound"] == "< 0.33"  # dense's 1,000 already pass it


def test_a_non_monotone_dense_curve_uses_its_first_crossing():
    eff = efficiency()
    dense = {3000: 1.60, 6000: 1.50, 12000: 1.55}  # overfits after 6,000
    n, bound = eff.steps_to_reach(dense, 1.55)
    assert bound == "" and n == pytest.approx(math.exp((math.log(3000) + math.log(6000)) / 2))


@pytest.mark.slow
def test_runs_time_and_report_end_to_end(tmp_path, monkeypatch, capsys):
    eff = efficiency()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):  # one of them validates
        (corpus / f"doc{i}.txt").write_text(f"play {i}: to be, or not to be. " * 40)
    tiny = ("--n_embd 16 --n_head 2 --n_layer 1 --block_size 16 --batch_size 2 --num_moes 2 "
            "--num_experts 2 --warmup_iters 1")
    out = tmp_path / "eff"
    common = ["--out", str(out), "--data_file", str(corpus), "--default_flags", tiny,
              "--dense_flags", tiny + " --router dense"]
    assert eff.main(["runs", *common, "--seeds", "7", "--default_steps", "2,4",
                     "--dense_steps", "2,4", "--eval_interval", "2", "--eval_iters", "1"]) == 0
    for name in ("default-2-s7", "default-4-s7", "dense-2-s7", "dense-4-s7"):
        evals = eff.evaluations(out / name)
        assert evals[-1]["step"] == int(name.split("-")[1])
    # A second call finds every run finished and trains nothing.
    assert eff.main(["runs", *common, "--seeds", "7", "--default_steps", "2,4",
                     "--dense_steps", "2,4"]) == 0
    assert "0 runs to do" in capsys.readouterr().out

    # `time`: each side's long process minus its short one, per step, A B A B.
    seconds = iter([9.0, 3.0, 9.0, 3.0] + [13.0, 3.0, 8.0, 3.0])  # warm-up pair, then 1 pair
    seen = []
    monkeypatch.setattr(eff, "himoe_train_seconds",
                        lambda flags, steps: seen.append(flags) or next(seconds))
    assert eff.main(["time", *common, "--repeats", "1", "--process_steps", "1,3"]) == 0
    assert "--router" in seen[-1] and "--router" not in seen[-3]
    timing = json.loads((out / "step_time.json").read_text())
    assert timing["ratio_default_over_dense"] == [pytest.approx((13 - 3) / (8 - 3))]

    assert eff.main(["report", "--out", str(out), "--data_file", str(corpus),
                     "--reference_steps", "2,4", "--json", str(tmp_path / "e.json"),
                     "--png", str(tmp_path / "e.png")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    seed = result["seeds"]["7"]
    # The held-out figure is himoe eval's loss on the validating document, one per run.
    report = json.loads((out / "default-4-s7.heldout.json").read_text())
    assert seed["curves"]["heldout"]["default"]["4"] == report["loss"]
    assert report["documents"] == 1
    assert seed["sampled"]["step_time_ratio"] == pytest.approx(2.0)
    assert set(result["balance"]) == {"default-2-s7", "default-4-s7"}
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
