"""benchmarks/step_phases.py: each side's step is the sum of its timed phases, and the bound
prices each MoE layer's routed part at the cost of a dense FFN of its FLOPs."""

import torch

from himoe.config import HiMoEConfig
from himoe.model.experts import DenseFFN
from tests.conftest import load_benchmark

TINY = dict(vocab_size=65, n_embd=16, n_head=2, block_size=16, num_moes=2, num_experts=3,
            batch_size=4)


def test_steps_are_the_sum_of_their_phases_and_every_repeat_is_kept():
    sp = load_benchmark("step_phases")
    result = sp.measure(HiMoEConfig(**TINY).validate(),
                        HiMoEConfig(**TINY, router="dense").validate(), repeats=3, warmup=1)
    for rows in result["steps"].values():
        assert len(rows) == 3
        for row in rows:
            assert len(row) == len(sp.PHASES) and abs(sum(row[:-1]) - row[-1]) < 1e-9
    assert [len(a) for a in result["active"]] == [2, 2, 2]  # 2 MoE layers, 3 repeats
    assert all(1 <= n <= 6 for a in result["active"] for n in a)  # 2 x 3 experts
    assert len(result["parts"]) == 3 and all(len(p) == len(sp.LAYER_PARTS)
                                             for p in result["parts"])


def test_bound_replaces_each_layers_routed_excess_by_nothing():
    sp = load_benchmark("step_phases")
    # Default step 10 ms, dense 8 ms; the routed part costs 1 ms more than the dense FFN
    # in each of 2 layers, so without that excess the default would take 8 ms: 1.00x.
    result = {"steps": {"default": [[9, 1, 0, 0, 10]], "dense": [[8, 0, 0, 0, 8]]},
              "parts": [[0.5, 3.0, 2.0]], "n_layer": 2, "active": [[5, 7], [9, 7]]}
    lines = sp.report(result)
    assert "Step ratio (dense ms / default ms, per repeat): 0.80x [0.80, 0.80]" in lines
    assert lines[-1].endswith("1.00x [1.00, 1.00]")
    assert "Experts with tokens in the timed steps, median per layer: 7 / 7" in lines
    assert "| forward+backward | 9.0 [9.0, 9.0] | 8.0 [8.0, 8.0] | +1.0 |" in lines


def test_timing_a_layer_leaves_the_routers_counts_as_they_were():
    sp = load_benchmark("step_phases")
    side = sp.Side(HiMoEConfig(**TINY).validate())
    router = side.model.moe_layers[0].router
    before = [b.clone() for b in router.buffers()]
    x_TD = torch.randn(8, 16, requires_grad=True)
    assert len(sp.layer_parts_ms(side, x_TD, DenseFFN(16, 32))) == 3
    assert all(torch.equal(a, b) for a, b in zip(before, router.buffers()))
    assert x_TD.grad is None


def test_sweep_runs_each_batch_size_and_reports_rows_per_expert(tmp_path):
    sp = load_benchmark("step_phases")
    cfg = HiMoEConfig(**TINY).validate()
    runs = sp.sweep(cfg, HiMoEConfig(**TINY, router="dense").validate(), [2, 8],
                    repeats=2, warmup=1)
    assert [c.batch_size for c, _ in runs] == [2, 8]
    assert all(len(r["steps"]["default"]) == 2 for _, r in runs)
    png = tmp_path / "sweep.png"
    lines = sp.sweep_report(runs, cfg, png)
    # 8 x 16 tokens, top-1 of 2 groups, then top-2 of its 3 experts: 256 rows over 6.
    assert lines[3].startswith("| 8 | 128 | 43 |")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sweep_rows_carry_each_batch_sizes_ratio_and_bound():
    sp = load_benchmark("step_phases")
    cfg = HiMoEConfig(**TINY).validate()
    result = {"steps": {"default": [[9, 1, 0, 0, 10]], "dense": [[8, 0, 0, 0, 8]]},
              "parts": [[0.5, 3.0, 2.0]], "n_layer": 2, "active": [[5, 7]]}
    row = sp.sweep_report([(cfg, result)], cfg)[2]
    assert row == "| 4 | 64 | 21 | 10.0 [10.0, 10.0] | 8.0 [8.0, 8.0] | 0.80x [0.80, 0.80] | " \
                  "1.00x [1.00, 1.00] |"
