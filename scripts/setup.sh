#!/usr/bin/env bash
# Make a virtual environment and install himoe into it.
#
#   setup.sh          .venv with himoe, every package at the version constraints.txt pins
#   setup.sh dev      the same plus the test tools and optional extras (pytest, ruff, ...),
#                     and, as root on Debian, the chromium the page's browser test drives
#   setup.sh latest   .venv-latest: himoe[dev] with the newest release of every package but
#                     torch, no constraints, so that a breaking upstream release shows up in
#                     our tests first (then `.venv-latest/bin/python -m pytest`)
#   setup.sh lock     rewrite constraints.txt from .venv-latest, once its tests pass
#
# torch: an existing torch >= 2.4 in the venv is kept. Otherwise, with an NVIDIA GPU present,
# pip's default build of the pinned torch (CUDA); without one, a CPU build: TORCH_SPEC
# (default: the torch line of constraints.txt, a CPU wheel on our build machines), from
# TORCH_INDEX_URL when it is set (for example PyTorch's own CPU index) so that a laptop does
# not download gigabytes of CUDA. A torch upgrade is its own decision, so `latest` keeps
# this torch too; install another one into .venv-latest first to test it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
mode=${1:-}
case "$mode" in
  ""|dev) venv=.venv ;;
  latest) venv=.venv-latest ;;
  lock)
    [ -x .venv-latest/bin/python ] || { echo "setup: run 'setup.sh latest' first" >&2; exit 2; }
    { grep '^#' constraints.txt
      .venv-latest/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$//'; } \
      > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt
    echo "setup: constraints.txt now pins what .venv-latest has" >&2; exit 0 ;;
  *) echo "setup: unknown mode '$mode'; use dev, latest or lock (or none)" >&2; exit 2 ;;
esac
torch_pin=$(grep -m1 '^torch==' constraints.txt)
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip -q --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 4))" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing $torch_pin with CUDA" >&2
    "${pip[@]}" install "$torch_pin"
  else
    echo "setup: no GPU found, installing a CPU build of torch (${TORCH_SPEC:-$torch_pin})" >&2
    "${pip[@]}" install "${TORCH_SPEC:-$torch_pin}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
# Everything else comes from the pins (or, for `latest`, the newest releases); the torch
# installed above is held where it is either way.
keep=$(mktemp); trap 'rm -f "$keep"' EXIT
"$venv/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$keep"
extras=""
[ "$mode" = "" ] || extras="[dev]"
if [ "$mode" = latest ]; then
  "${pip[@]}" install --upgrade --upgrade-strategy eager -e ".${extras}" -c "$keep"
  echo "setup: newest releases in $venv:" >&2
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -iE \
    '^(torch|numpy|tokenizers|safetensors|tqdm|matplotlib|transformers|huggingface.hub|tensorboard|pytest|ruff)==' >&2
else
  grep -v '^torch==' constraints.txt >> "$keep"
  "${pip[@]}" install -e ".${extras}" -c "$keep"
fi
# The browser test of `himoe view` drives Debian's headless chromium; without it, it skips.
if [ "$mode" = dev ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the browser test of himoe view" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      >/dev/null 2>&1 || echo "setup: chromium could not be installed; that test skips" >&2
  else
    echo "setup: no chromium (Debian's package); the browser test of himoe view skips" >&2
  fi
fi
echo "setup: ready; run $venv/bin/himoe --help" >&2
