"""benchmarks/default_study.py: a tiny run appends its line and the report reads it."""

import json

import pytest

from tests.conftest import load_benchmark

TINY = dict(n_embd=16, n_head=2, block_size=16, num_moes=2, num_experts=2, batch_size=2,
            max_iters=2, eval_interval=1, eval_iters=1)


def study():
    return load_benchmark("default_study")


@pytest.mark.slow
def test_runs_append_lines_and_the_report_averages_seeds(tmp_path):
    s = study()
    out = tmp_path / "runs.jsonl"
    for seed in (1, 2):
        s.main([f"default-{seed}", json.dumps(TINY | {"seed": seed}), "--out", str(out)])
    s.main(["card-1", json.dumps(TINY | {"preset": "himoe-card"}), "--out", str(out)])
    lines = [json.loads(t) for t in out.read_text().splitlines()]
    assert [line["name"] for line in lines] == ["default-1", "default-2", "card-1"]
    assert [e["step"] for e in lines[0]["evals"]] == [1, 2]
    assert lines[2]["overrides"]["preset"] == "himoe-card"
    # Equal active widths; the default has two more output biases (the shared expert's and
    # its second routed expert's) in each of its 2 layers.
    assert lines[0]["active"] == lines[2]["active"] + 2 * 16 * 2
    png = tmp_path / "curves.png"
    table = s.report(lines, png)
    mean = (lines[0]["evals"][-1]["val"] + lines[1]["evals"][-1]["val"]) / 2
    assert f"| default | 2 | {mean:.4f} [" in table and "| card | 1 |" in table
    assert png.stat().st_size > 0
