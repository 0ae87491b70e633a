"""`himoe --help` and each command's --help build the parser from the standard library and
himoe's config alone: torch (seconds to import) loads only when a command runs."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "numpy", "tqdm", "tokenizers", "safetensors", "matplotlib")


def imported(argv: list[str]) -> set[str]:
    """Top-level names of every module `python -m himoe ARGV` imported (-X importtime)."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "himoe", *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "usage: himoe" in r.stdout
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in r.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["generate", "--help"],
                                  ["experts", "list", "--help"], ["export-hf", "--help"],
                                  ["experts", "prune", "--help"], ["upcycle", "--help"]])
def test_help_imports_no_torch(argv):
    names = imported(argv)
    assert "himoe" in names  # the parse worked: the list is real
    assert not names & set(HEAVY), sorted(names & set(HEAVY))
