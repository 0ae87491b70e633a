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
    assert report["prepare"]["encode_batch_mb_s"] > 0
    assert {"train_small_prepared", "train_large_prepared", "train_small_in_memory"} <= \
        set(report)
    assert all(report[k]["peak_rss_mb"] > 0 for k in report if k.startswith("train"))
