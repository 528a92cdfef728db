#!/usr/bin/env bash
# GPU acceptance, for an operator with an NVIDIA GPU (it cannot run on a machine without one): installs the
# project beside vllm 0.33 in .venv-gpu (reused when present) and runs the engine tests of tests/patches on
# CUDA against the HF oracle, once per model runner steering supports (V1, V2): eager, compiled with CUDA
# graphs FULL and PIECEWISE, chunked prefill, preemption, registration while requests run, plus the seam
# and unit tests and the no-host-sync check of row uploads.
# Usage: bash scripts/gpu-acceptance.sh [--save] [pytest args...]   (--save writes docs/checks/gpu-acceptance.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
save=0
if [ "${1:-}" = "--save" ]; then save=1; shift; fi
venv=.venv-gpu
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -e ".[gpu,test]"
"$venv/bin/python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'" \
  || { echo "gpu-acceptance.sh: needs an NVIDIA GPU with a working driver" >&2; exit 1; }
log=$(mktemp)
set +e
{
  set -e
  echo "# scripts/gpu-acceptance.sh, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD)"
  "$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, '|', torch.cuda.get_device_name())"
  for runner in v1 v2; do
    echo "## model runner $runner"
    "$venv/bin/python" -m pytest tests/patches --device cuda --steering-runner "$runner" \
      -p no:cacheprovider -q -r fEp "$@"
  done
} 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$save" = 1 ]; then mkdir -p docs/checks && cp "$log" docs/checks/gpu-acceptance.txt; fi
rm -f "$log"
exit "$status"
