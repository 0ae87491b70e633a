"""benchmarks/merge_study.py end to end on a tiny shape: every stage runs as a plain himoe
command, every model is scored on every domain, and the MoE models report level-1 NMI."""

import json

import pytest

from tests.conftest import load_benchmark


@pytest.mark.slow
def test_the_study_runs_every_stage_and_scores_every_model(tmp_path, capsys):
    study = load_benchmark("merge_study")
    mix = tmp_path / "mix"
    (mix / "heldout").mkdir(parents=True)
    texts = {"code": "def f(x):\n    return x + 1\n", "prose": "The cat sat on the mat.\n",
             "drama": "HAMLET. To be, or not to be.\n"}
    lines = [json.dumps({"domain": d, "text": t * 30}) for d, t in texts.items() for _ in range(3)]
    (mix / "train.jsonl").write_text("\n".join(lines) + "\n")
    for d, t in texts.items():
        (mix / "heldout" / f"{d}.txt").write_text(t * 20)
    assert study.main(["--mix", str(mix), "--out", str(tmp_path / "out"), "--seed_steps", "2",
                       "--branch_steps", "2", "--tune_steps", "2", "--batch_size", "2",
                       "--vocab_size", "300", "--num_experts", "2",
                       "--shape", "--n_embd 16 --n_head 2 --n_layer 1 --block_size 16"]) == 0
    results = json.loads((tmp_path / "out" / "merge_study.json").read_text())
    assert set(results) == {"merged", "upcycled", "scratch_moe", "scratch_dense"}
    for name, fig in results.items():
        assert all(fig[d] > 0 for d in texts), name
        assert ("nmi_group" in fig) == (name != "scratch_dense")
    merged = json.loads((tmp_path / "out" / "merged" / "config.json").read_text())
    assert merged["step"] == 2 and merged["config"]["num_moes"] == 3
    assert "| merged |" in capsys.readouterr().out
