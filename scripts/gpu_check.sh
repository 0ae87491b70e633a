#!/usr/bin/env bash
# The first check on a GPU, in minutes: bash scripts/gpu_check.sh [OUT.md]
#
#   1. the tests marked `cuda` (grouped_mm against the per-token reference in fp32 and bf16,
#      training steps, save and exact resume, the KV cache and generation on the GPU)
#   2. the GPU rows of `himoe bench`: the MoE layer against a dense FFN at 8k-64k tokens in
#      bf16, and card training tokens/s and MFU against the dense-equivalent
#   3. a 20-step `torchrun` run over NCCL, on every GPU visible
# and writes what it measured to docs/gpu.md (or OUT.md). CI never runs this: it has no GPU.
#
# Python: .venv's where scripts/setup.sh made one (it installs a CUDA torch where nvidia-smi
# sees a GPU); otherwise a python3 that already has torch, with himoe from src/ (a GPU
# machine without network access). The tests and runs are bounded so that the whole check
# takes about 5 minutes on one H100.
#
# GPU_CHECK_REHEARSAL=1 runs the same steps on the CPU, small (the cuda tests skip, the bench
# is --smoke, torchrun uses gloo): a test runs it so that the script itself is known to work
# before a GPU's minutes are spent on it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/gpu.md}
rehearsal=${GPU_CHECK_REHEARSAL:-}
device=cuda
smoke=()
if [ -n "$rehearsal" ]; then
  device=cpu
  smoke=(--smoke)
elif ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU is visible (nvidia-smi -L failed); run it on a GPU machine" >&2
  exit 2
fi
if [ -x .venv/bin/python ]; then
  py=.venv/bin/python
elif python3 -c "import torch" 2>/dev/null; then
  py=python3
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  bash scripts/setup.sh dev
  py=.venv/bin/python
fi
[ -n "$rehearsal" ] || "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check: $py has a torch without CUDA; install a CUDA build (scripts/setup.sh)" >&2
  exit 2; }
export CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONUNBUFFERED=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)

echo "== 1/3 tests marked cuda" >&2
set +e
timeout 240 "$py" -m pytest -m cuda tests/gpu -q -p no:cacheprovider 2>&1 | tee "$work/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== 2/3 himoe bench, GPU rows" >&2
timeout 240 "$py" -m himoe bench --only layer,gpu --repeats 5 --steps 10 --warmup 3 \
  ${smoke[@]+"${smoke[@]}"} --out "$work/bench.md" 2>&1 | tee "$work/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== 3/3 torchrun over NCCL (gloo in a rehearsal)" >&2
if [ -n "$rehearsal" ]; then
  gpus=1 steps=2 gpu_name="none (a rehearsal on the CPU)"
else
  gpus=$(nvidia-smi -L | wc -l) steps=20
  gpu_name=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
fi
timeout 180 "$py" -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m himoe train \
  --device "$device" --max_iters "$steps" --eval_interval "$steps" --eval_iters 2 \
  --sample_tokens 20 --model_dir "$work/ddp" 2>&1 | tr '\r' '\n' | grep -v '^train: ' \
  | tee "$work/ddp.log"
ddp_rc=${PIPESTATUS[0]}
set -e

status() { [ "$1" = 0 ] && echo "passed" || echo "**failed (exit $1)**"; }
{
  echo "# himoe on a GPU"
  echo
  echo "Written by \`bash scripts/gpu_check.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), in $(( $(date +%s) - t0 )) s."
  echo
  echo "- GPU: ${gpu_name} (${gpus} visible)"
  echo "- $("$py" -c 'import torch, platform; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}")')"
  echo
  echo "## 1. Tests marked \`cuda\`: $(status "$tests_rc")"
  echo
  echo '```'
  tail -n 15 "$work/tests.log"
  echo '```'
  echo
  echo "## 2. \`himoe bench --only layer,gpu\`: $(status "$bench_rc")"
  echo
  if [ -f "$work/bench.md" ]; then
    sed -n '/^| benchmark/,/^$/p' "$work/bench.md"
  else
    echo '```'; tail -n 15 "$work/bench.log"; echo '```'
  fi
  echo
  echo "## 3. torchrun, ${steps} steps on ${gpus} GPU(s) over NCCL: $(status "$ddp_rc")"
  echo
  echo '```'
  grep -E "^(step|parameters|corpus|distributed|saved|val|himoe)" "$work/ddp.log" | tail -n 12 || tail -n 12 "$work/ddp.log"
  echo '```'
} > "$out.tmp" && mv "$out.tmp" "$out"
echo "gpu_check: figures written to $out" >&2
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$ddp_rc" = 0 ]
