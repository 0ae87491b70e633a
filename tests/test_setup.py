"""scripts/setup.sh installs exactly what constraints.txt pins, and the pins agree with the
package's own ranges: a new upstream release cannot change what CI and a new user test."""

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup.sh"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def pins() -> dict[str, str]:
    """{normalised name: version} of constraints.txt; fails on any line that is not a pin."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line.strip())
        assert m, f"constraints.txt: {line!r} is not NAME==VERSION"
        out[normalise(m[1])] = m[2]
    return out


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_installs(mode_block: str) -> list[list[str]]:
    """The argument lists of every `pip install` in a piece of setup.sh."""
    return [shlex.split(line.split("install", 1)[1]) for line in mode_block.splitlines()
            if '"${pip[@]}" install' in line]


@pytest.mark.slow
def test_setup_installs_himoe_with_the_constraints_file():
    script = SETUP.read_text()
    pinned_branch = script.split('if [ "$mode" = latest ]; then')[1].split("else", 1)[1]
    installs = pip_installs(pinned_branch.split("fi", 1)[0])
    assert installs and all("-c" in args for args in installs), installs
    # the file given to -c is constraints.txt less torch, plus the torch installed above
    assert "grep -v '^torch==' constraints.txt >> \"$keep\"" in pinned_branch
    # torch itself: the pin is the default for both the CPU and the CUDA install
    assert "torch_pin=$(grep -m1 '^torch==' constraints.txt)" in script
    assert '"${pip[@]}" install "$torch_pin"' in script
    assert '${TORCH_SPEC:-$torch_pin}' in script
    assert "torch" in pins()


def test_setup_rejects_an_unknown_mode():
    r = subprocess.run(["bash", str(SETUP), "nightly"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown mode 'nightly'" in r.stderr


def test_every_installed_package_is_pinned_at_its_installed_version():
    if not VENV_PYTHON.exists():
        pytest.skip("no .venv: run `bash scripts/setup.sh dev` first")
    freeze = subprocess.run([str(VENV_PYTHON), "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    pinned = pins()
    for line in freeze.splitlines():
        name, _, version = line.partition("==")
        name = normalise(name)
        if name.startswith("nvidia-") or name == "triton":
            continue  # a CUDA torch's own runtime, pinned by that torch
        assert name in pinned, f"{name} is installed in .venv but not pinned in constraints.txt"
        assert pinned[name] == version.split("+")[0], f"{name}: .venv has {version}"


def test_pins_satisfy_the_package_ranges():
    specifiers = pytest.importorskip("packaging.requirements")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values()
                                      for r in extra]
    pinned = pins()
    for text in reqs:
        req = specifiers.Requirement(text)
        assert normalise(req.name) in pinned, f"{req.name} is a requirement but not pinned"
        assert req.specifier.contains(pinned[normalise(req.name)]), (
            f"constraints.txt pins {req.name}=={pinned[normalise(req.name)]} outside {text}")
