"""benchmarks/long_runs.py: the table of finished and unfinished runs, from metrics.jsonl."""

import json
from pathlib import Path

from tests.conftest import load_benchmark


def long_runs():
    return load_benchmark("long_runs")


def write_run(model_dir: Path, losses: dict[int, float], layers: list[dict]) -> None:
    model_dir.mkdir()
    lines = [{"step": 1, "train_loss": 3.0}] + [
        {"step": s, "val_loss": v, "layers": layers} for s, v in losses.items()]
    (model_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_table_has_a_row_per_run_with_the_last_balance_and_dead_from_500_on(tmp_path, capsys):
    layer = {"expert_cv": 0.25, "expert_maxvio": 0.4, "dead_experts": 0}
    write_run(tmp_path / "dense", {500: 2.3, 1000: 2.0}, [])
    write_run(tmp_path / "moe", {500: 2.2, 1000: 1.9}, [layer, layer | {"dead_experts": 2}])
    write_run(tmp_path / "half", {500: 2.1}, [layer, layer])
    write_run(tmp_path / "early", {250: 2.4}, [layer | {"dead_experts": 5}, layer])
    assert long_runs().main([str(tmp_path / n) for n in ("dense", "moe", "half", "early")]
                            + ["--steps", "500,1000", "--jsonl", str(tmp_path / "all.jsonl"),
                               "--maxvio_png", str(tmp_path / "maxvio.png")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[2] == "| dense | 2.3000 | 2.0000 | - | - | - |"
    assert rows[3] == "| moe | 2.2000 | 1.9000 | 0.25 / 0.25 | 0.40 / 0.40 | 2 |"
    assert rows[4] == "| half | 2.1000 |  | 0.25 / 0.25 | 0.40 / 0.40 | 0 |"
    assert rows[5] == "| early |  |  | 0.25 / 0.25 | 0.40 / 0.40 |  |"  # none from 500 yet
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == 6  # evaluations only
    # Drawn from the MoE runs alone: the dense run has no layer to plot.
    assert (tmp_path / "maxvio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
