"""`himoe analyze`: routing by domain, its NMI, the report and the heatmaps."""

import io
import json

import pytest
import torch

from himoe.analysis.domains import STAGE, nmi, play_domains, route_counts, top_tokens, windows
from himoe.checkpoint.card import load_model
from himoe.checkpoint.verify import verify
from himoe.data.corpus_files import default_corpus_path
from himoe.training.trainer import Trainer
from tests.cli.test_bad_input import assert_one_line_error, himoe
from tests.edit.test_experts import small_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    Trainer(small_config(root / "m"), out=io.StringIO()).train()
    return root / "m"


def test_hamlet_splits_into_the_main_speakers_and_the_stage_directions():
    parts = play_domains(default_corpus_path().read_text(encoding="utf-8"))
    assert list(parts) == ["Ham", "King", "Pol", "Hor", "Laer", STAGE]
    assert len(parts["Ham"]) > 50_000 and len(parts[STAGE]) > 4_000
    assert "[Aside" not in parts["Ham"] and "\nHam.\n" not in parts["Ham"]
    assert parts["Ham"].startswith("A little more than kin")  # his first speech, minus "[Aside.]"
    assert parts[STAGE].startswith("[Francisco at his post. Enter to him Bernardo.]\n")


def test_nmi_is_one_for_specialised_experts_and_zero_for_shared_ones():
    assert nmi(torch.tensor([[10, 0], [0, 10]])) == pytest.approx(1.0)
    assert nmi(torch.tensor([[5, 5], [5, 5]])) == pytest.approx(0.0)
    assert 0 < nmi(torch.tensor([[9, 1], [2, 8]])) < 1
    assert nmi(torch.tensor([[3, 7]])) is None  # one domain: undefined
    ids = list(range(100))
    w = windows(ids, 16, 48)  # 6 windows in the text, 3 kept, spread to the end
    assert w.tolist()[0] == ids[:16] and w.tolist()[-1] == ids[80:96] and w.shape == (3, 16)


def test_routing_by_token_matches_a_count_one_window_at_a_time(model_dir):
    model = load_model(model_dir)[0]
    gen = torch.Generator().manual_seed(0)
    windows_WS = torch.randint(model.cfg.vocab_size, (5, 16), generator=gen)
    counts_LE, tokens_LEV = route_counts(model, windows_WS, batch=2)
    naive = torch.zeros_like(tokens_LEV)
    model.eval()
    for window in windows_WS:
        with torch.no_grad():
            model(window[None])
        for i, moe in enumerate(model.moe_layers.values()):
            for token, experts in zip(window.tolist(), moe.last_ids_TK.tolist()):
                for e in experts:
                    naive[i, e, token] += 1
    assert torch.equal(tokens_LEV, naive) and torch.equal(counts_LE, naive.sum(-1))
    assert top_tokens(torch.tensor([[0, 5, 1], [2, 0, 0]]), lambda ids: "abc"[ids[0]]) == [
        [("b", 5 / 6), ("c", 1 / 6)], [("a", 1.0)]]


def test_analyze_splits_the_corpus_by_speaker_and_writes_report_and_heatmaps(model_dir,
                                                                             tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = himoe(["analyze", "--model_dir", model_dir, "--out", out,
                               "--max_tokens", "64", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "NMI(domain; expert)" in stdout and "expert 2.2" in stdout and "King" in stdout
    assert "reads most" in stdout
    report = json.loads((out / "analysis.json").read_text())
    assert [d["name"] for d in report["domains"]][-1] == STAGE
    assert all(d["tokens"] == 64 for d in report["domains"])
    assert len(report["layers"]) == 2
    for layer in report["layers"]:
        assert 0 <= layer["nmi_expert"] <= 1 and 0 <= layer["nmi_group"] <= 1
        for shares in layer["expert_share"].values():
            assert sum(shares) == pytest.approx(1.0) and len(shares) == 4
        assert {"expert_cv", "expert_maxvio", "dead_experts"} <= set(layer["balance"])
        for share, top in zip(layer["balance"]["expert_share"], layer["expert_top_tokens"]):
            assert bool(top) == (share > 0) and sum(s for _, s in top) <= 1 + 1e-9
    for layer in (1, 2):
        assert (out / f"layer_0{layer}_domain_expert.png").read_bytes()[:4] == b"\x89PNG"
    assert not verify(model_dir)[0]


def test_user_domains_skip_unknown_characters_and_say_how_many(model_dir, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("To be, or not to be: that is the question.\n" * 3)
    (tmp_path / "b.txt").write_text("Grüße §§ aus Köln, my lord.\n" * 3)
    out = tmp_path / "o"
    code, stdout, err = himoe(["analyze", "--model_dir", model_dir, "--domain",
                               f"verse={tmp_path / 'a.txt'}", "--domain",
                               f"mixed={tmp_path / 'b.txt'}", "--out", out, "--no_plots"],
                              capsys)
    assert code == 0, err
    report = json.loads((out / "analysis.json").read_text())
    skipped = {d["name"]: d["skipped_chars"] for d in report["domains"]}
    assert skipped == {"verse": 0, "mixed": 5 * 3}  # ü, ß, §, §, ö on each line
    assert "mixed: skipped 15 characters" in err and "15 characters outside" in stdout
    assert not list(out.glob("*.png"))
    code, _, err = himoe(["analyze", "--model_dir", model_dir, "--domain", "nofile"], capsys)
    assert_one_line_error(code, err, "is not NAME=FILE")
    code, _, err = himoe(["analyze", "--model_dir", model_dir, "--domain",
                          f"x={tmp_path / 'missing.txt'}"], capsys)
    assert_one_line_error(code, err, "does not exist")
