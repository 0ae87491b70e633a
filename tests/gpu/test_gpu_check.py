"""scripts/gpu_check.sh rehearsed on the CPU (GPU_CHECK_REHEARSAL=1): the same three steps,
small, so that the script itself is known to work before a GPU's minutes go to it."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_check_rehearsal_writes_its_report(tmp_path):
    out = tmp_path / "gpu.md"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)],
                       env=os.environ | {"GPU_CHECK_REHEARSAL": "1"}, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = out.read_text()
    for section in ("## 1. Tests marked `cuda`: passed", "## 2. `himoe bench --only layer,gpu`: "
                    "passed", "steps on 1 GPU(s) over NCCL: passed"):
        assert section in report, report
    assert "| MoE layer forward+backward" in report and "val loss" in report


@pytest.mark.skipif(shutil.which("nvidia-smi", path="/usr/bin:/bin") is not None,
                    reason="a GPU machine: the check would run")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_REHEARSAL"}
    env["PATH"] = "/usr/bin:/bin"  # no nvidia-smi
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "g.md")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "no NVIDIA GPU is visible" in r.stderr and not (tmp_path / "g.md").exists()
