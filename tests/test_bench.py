"""`himoe bench --smoke`: the benchmark harness still runs end to end. No timing is asserted:
a benchmark is not a test (BENCHMARKS.md)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| benchmark | measured (median) | baseline (median) | ratio median [min, max] |"
ROWS = ("| card training:", "| grouped 6 x top-1", "| generation of", "| peak memory (RSS)",
        "| MoE layer forward+backward", "| card training on a GPU")


def test_bench_smoke_writes_a_report_with_every_section(tmp_path):
    out = tmp_path / "b.md"
    r = subprocess.run([sys.executable, "-m", "himoe", "bench", "--smoke", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = out.read_text()
    assert HEADER in report and HEADER in r.stdout
    for row in ROWS:
        assert sum(line.startswith(row) for line in report.splitlines()) == 1, row
    assert "- machine:" in report and "- torch " in report
    assert "- command: `himoe bench --smoke --out " in report
    assert not list(tmp_path.glob(".b.md.*"))  # the temporary file was renamed into place


def test_bench_rejects_an_unknown_section(tmp_path):
    r = subprocess.run([sys.executable, "-m", "himoe", "bench", "--only", "speed"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--only" in r.stderr
