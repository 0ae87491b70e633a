"""The routing study's tiny version: the script runs end to end and writes its outputs."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_routing_study_smoke(tmp_path):
    out = tmp_path / "study.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "routing_study.py"), "--smoke",
                        "--seeds", "1", "--variants", "himoe-card,hi-moe,olmoe,dense",
                        "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    for variant in ("himoe-card", "hi-moe", "olmoe", "dense"):
        assert f"| {variant} |" in text
    assert "## The paper's claims, as measured" in text and "Perplexity: hi-moe" in text
    assert (tmp_path / "study_load.png").stat().st_size > 0
    assert (tmp_path / "study_loss.png").stat().st_size > 0
