#!/usr/bin/env bash
# Make .venv and install himoe into it (`setup.sh dev` adds pytest and ruff).
# torch: an existing torch >= 2.4 in .venv is kept. Otherwise, with an NVIDIA GPU present,
# pip's default torch (a CUDA build); without one, a CPU build: TORCH_SPEC (default
# torch==2.13.0, a CPU wheel on our build machines), from TORCH_INDEX_URL when it is set
# (for example PyTorch's own CPU index) so a laptop does not download gigabytes of CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch, sys; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 4))" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing torch with CUDA" >&2
    "${pip[@]}" install "torch>=2.4"
  else
    echo "setup: no GPU found, installing a CPU build of torch (${TORCH_SPEC:-torch==2.13.0})" >&2
    "${pip[@]}" install "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
extras=""
[ "${1:-}" = "dev" ] && extras="[dev]"
"${pip[@]}" install -e ".${extras}"
echo "setup: ready; run .venv/bin/himoe --help" >&2
