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
    headers = tmp_path / "include"
    headers.mkdir()
    for i in range(8):
        (headers / f"h{i}.h").write_text(f"#define N{i} {i}\nint f{i}(void);\n" * 20)
    assert study.main(["--mix", str(mix), "--out", str(tmp_path / "out"), "--seed_steps", "2",
                       "--branch_steps", "2", "--tune_steps", "2", "--batch_size", "2",
                       "--vocab_size", "300", "--num_experts", "2",
                       "--add_steps", "2", "--fourth_dir", str(headers),
                       "--shape", "--n_embd 16 --n_head 2 --n_layer 1 --block_size 16"]) == 0
    results = json.loads((tmp_path / "out" / "merge_study.json").read_text())
    added = results.pop("added_c")
    assert set(results) == {"merged", "upcycled", "scratch_moe", "scratch_dense",
                            "merged_plus_c", "merged_more", "merged_more_old_mix"}
    for name, fig in results.items():
        assert all(fig[d] > 0 for d in [*texts, "c"]), name
        assert ("nmi_group" in fig) == (name != "scratch_dense")
    assert added["gain_on_c"] == results["merged"]["c"] - results["merged_plus_c"]["c"]
    assert added["others_change_against_old_mix"]["prose"] == \
        results["merged_more_old_mix"]["prose"] - results["merged_plus_c"]["prose"]
    merged = json.loads((tmp_path / "out" / "merged" / "config.json").read_text())
    assert merged["step"] == 2 and merged["config"]["num_moes"] == 3
    # the fourth domain joins as a fourth group; the controls keep three, and one of them
    # goes on without the fourth domain's text
    for name, groups, corpus in (("merged_plus_c", 4, "mix4.jsonl"),
                                 ("merged_more", 3, "mix4.jsonl"),
                                 ("merged_more_old_mix", 3, "train.jsonl")):
        saved = json.loads((tmp_path / "out" / name / "config.json").read_text())
        assert saved["step"] == 4 and saved["config"]["num_moes"] == groups, name
        assert saved["config"]["data_file"].endswith(corpus), name
    assert "| merged |" in capsys.readouterr().out
    assert (tmp_path / "out" / "merge_curves.png").stat().st_size > 0
    # the report over seeds (here one, twice): every model a row, every MoE its balance
    assert study.main(["report", str(tmp_path / "out"), str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    merged_row = next(x for x in table.splitlines() if x.startswith("| merged |"))
    code = results["merged"]["code"]
    assert f"{code:.4f} ({code:.4f}, {code:.4f})" in merged_row
    assert results["merged"]["balance"][0]["dead"] >= 0
    assert merged["config"]["group_shares"] and "largest CV within a group" in table
    assert "| after against the control on the four domains (merged_more) | - |" in table
    assert "| after against the same steps on the three domains" in table
    # the added group closed at level 1: closed nowhere is the model as `himoe eval` saw it
    assert study.main(["closed", "--mix", str(mix), str(tmp_path / "out")]) == 0
    closed = json.loads((tmp_path / "out" / "closed_group.json").read_text())
    assert list(closed) == ["closed in none", "closed in layer 1"]  # one layer: no "every"
    for d in texts:
        assert closed["closed in none"][d] == pytest.approx(results["merged_plus_c"][d],
                                                            rel=1e-5)


def test_within_group_cv_by_hand():
    study = load_benchmark("merge_study")
    layer = {"expert_share": [0.1, 0.3, 0.3, 0.3], "group_sizes": [2, 2]}
    assert study.within_group_cv(layer) == pytest.approx(0.5)  # [0.1, 0.3]: std 0.1, mean 0.2
    ragged = {"expert_share": [0.4, 0.0, 0.3, 0.3], "group_sizes": [1, 2]}
    assert study.within_group_cv(ragged) == 0.0  # the empty slot is no expert
