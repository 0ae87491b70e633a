"""`himoe bench --smoke`: the benchmark harness still runs end to end. No timing is asserted:
a benchmark is not a test (docs/studies.md, "Speed")."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from himoe.bench.throughput import REPORT_BEGIN, REPORT_END, with_report

ROOT = Path(__file__).resolve().parents[2]
HEADER = "| benchmark | measured (median) | baseline (median) | ratio median [min, max] |"
ROWS = ("| card training in one process:", "| grouped 6 x top-1",
        "| training step: the default model vs transformers Qwen2-MoE", "| generation of",
        "| peak memory (RSS)", "| MoE layer forward+backward", "| card training on a GPU")
# Every section but the whole-process one: its dozen `himoe train` launches would take
# minutes on a busy 2-core machine; its arithmetic is tested below with a fake clock.
IN_PROCESS = "card,grouped,peer,generate,memory,layer,gpu"


@pytest.mark.slow
def test_bench_smoke_writes_a_report_with_every_section(tmp_path):
    out = tmp_path / "b.md"
    r = subprocess.run([sys.executable, "-m", "himoe", "bench", "--smoke", "--only", IN_PROCESS,
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    report = out.read_text()
    assert HEADER in report and HEADER in r.stdout
    for row in ROWS:
        assert sum(line.startswith(row) for line in report.splitlines()) == 1, row
    assert "- machine:" in report and "- torch " in report
    assert f"- command: `himoe bench --smoke --only {IN_PROCESS} --out " in report
    assert not list(tmp_path.glob(".b.md.*"))  # the temporary file was renamed into place


def test_a_report_replaces_only_the_last_report_in_its_file():
    first = with_report(None, "run 1\n")
    notes = "# My notes\n\nkept\n" + first + "\nmore notes\n"
    second = with_report(notes, "run 2\n")
    assert second == ("# My notes\n\nkept\n" + first.replace("run 1", "run 2")
                      + "\nmore notes\n")
    assert "run 1" not in second and second.count(REPORT_BEGIN) == 1
    # A file that holds no report (a user's own benchmarks.md) keeps all it had.
    theirs = with_report("their table\n", "run 3\n")
    assert theirs.startswith("their table\n\n") and theirs.endswith("run 3\n" + REPORT_END + "\n")


@pytest.mark.slow
def test_bench_rejects_an_unknown_section(tmp_path):
    r = subprocess.run([sys.executable, "-m", "himoe", "bench", "--only", "speed"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--only" in r.stderr


def test_process_rows_time_the_long_minus_the_short_run(monkeypatch):
    from himoe.bench import throughput as bench

    calls = []

    def fake_seconds(flags, steps, settings):
        # 2 s to start; a step of the variant takes 0.5 s, of dense 0.4 s
        calls.append((tuple(flags), steps))
        return 2.0 + steps * (0.4 if "dense" in flags else 0.5)

    monkeypatch.setattr(bench, "train_process_seconds", fake_seconds)
    settings = bench.Settings(repeats=3, steps=1, warmup=1, threads=1, smoke=False)
    rows = bench.bench_train_processes(settings)
    assert len(rows) == len(bench.PROCESS_VARIANTS)
    assert all(row.ratio.startswith("0.80x") for row in rows)  # 0.4 / 0.5, start-up cancelled
    short, long = bench.PROCESS_STEPS["full"]
    assert calls[:4] == [((), long), ((), short), (("--router", "dense"), long),
                         (("--router", "dense"), short)]  # A B A B, each long then short
    assert len(calls) == 4 * 3 * len(bench.PROCESS_VARIANTS)


def test_the_peer_matches_the_defaults_parameters_and_active_ffn_flops():
    """Qwen2-MoE's SwiGLU experts 2/3 as wide as the default's GELU ones: the same weights
    per expert, so the same parameters within the embeddings' and norms' differences."""
    pytest.importorskip("transformers")
    from himoe.bench.peer import QwenMoeSide, qwen2_moe_config
    from himoe.config import HiMoEConfig
    from himoe.model import HiMoEModel

    # The default's width: at a tiny one the rounding below would be a larger share.
    cfg = HiMoEConfig(vocab_size=65, block_size=16, batch_size=2, device="cpu").validate()
    qcfg = qwen2_moe_config(cfg)
    assert qcfg.num_experts == 48 and qcfg.num_experts_per_tok == 2
    # Multiply-adds per token of the experts and the shared expert: 3 D I against 2 D F,
    # the experts' I rounded to a multiple of 8 (grouped_mm's 16-byte rows).
    assert qcfg.moe_intermediate_size % 8 == 0
    assert 3 * qcfg.moe_intermediate_size == pytest.approx(2 * cfg.ffn_hidden, abs=3 * 4)
    assert 3 * qcfg.shared_expert_intermediate_size == pytest.approx(2 * cfg.shared_hidden,
                                                                     abs=2)
    peer = QwenMoeSide(cfg)
    ours = sum(p.numel() for p in HiMoEModel(cfg).parameters())
    assert abs(peer.parameter_count() - ours) / ours < 0.02
    x_BT = torch.randint(0, 65, (2, 16))
    first = peer.step(x_BT, x_BT.roll(-1, 1))
    assert first > 0 and peer.step(x_BT, x_BT.roll(-1, 1)) < first  # it trains
