"""benchmarks/prepared_data.py: at tiny size it runs and reports every measurement."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_prepared_data_benchmark_smoke():
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prepared_data.py"),
                        "--smoke"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    enc = report["prepare_vs_encode_batch"]
    assert len(enc["prepare_mb_s"]) == len(enc["encode_batch_mb_s"]) == 1  # --smoke: 1 pair
    assert min(enc["prepare_mb_s"] + enc["encode_batch_mb_s"]) > 0
    rss = report["peak_rss_mb"]
    assert rss["small_prepared"] > 0 and rss["large_prepared"] > 0
    assert rss["difference"] == pytest.approx(rss["large_prepared"] - rss["small_prepared"],
                                              abs=0.11)
    assert report["train_tokens_per_s_prepared_vs_in_memory"].endswith("]")
