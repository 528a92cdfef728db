#!/usr/bin/env bash
# Checks unlock-serve against the upstream vllm 0.33 wheel, the vLLM of the GPU image, on any machine (no GPU
# needed: the wheel and its CUDA torch import without one). Installs the project beside vllm==0.33.0 in a
# second venv (.venv-vllm033, about 9 GB; reused when present) and runs:
#   1. `unlock-serve --help` (the console script starts: parser, seams);
#   2. the seam and wiring tests (tests/patches/test_seams.py: every seam resolves, plugin registration wraps
#      every seam and sets no environment variable, the V1 and V2 runner methods, their fields and call
#      order, the runner choice, the refusals, the data-parallel fan-out) and the patch's unit tests
#      (tests/patches/test_units.py), against 0.33's own classes; that the CLI never asks torch for a
#      GPU before vLLM starts its engine core; every Triton kernel compiled ahead of time to a cubin for
#      sm_80 and sm_90 with the wheel's own Triton (tests/patches/test_triton_aot.py), and the op's CUDA
#      path free of host syncs (tests/patches/test_cuda_path.py).
# Usage: bash scripts/check-vllm-0.33.sh [--save]   (--save also writes docs/checks/vllm-0.33.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-vllm033
# A first install needs 9.5 GB for the venv and, while pip runs, about 2 GB more for the wheels it downloads
# (11.2 GB at the peak on a fresh clone, 2026-12-06; kept in no cache: a second install reuses the venv).
# Say so before starting, not as an "[Errno 28] No space left on device" halfway through.
need_gb=12
free_gb=$(( $(df -Pk . | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
if [ ! -x "$venv/bin/python" ] && [ "$free_gb" -lt "$need_gb" ]; then
  echo "check-vllm-0.33.sh: installing vllm 0.33 into $venv needs about $need_gb GB free here; $free_gb GB is" >&2
  echo "  ($(df -Ph . | awk 'NR == 2 {print $4 " free on " $6}')). Free some space and run it again." >&2
  exit 1
fi
# No GPU here, so vLLM cannot infer a device for its config defaults (the parser builds them): its CPU
# platform stands in. Every import, seam, class and wiring checked below is the GPU wheel's own.
export VLLM_TARGET_DEVICE=cpu
log=$(mktemp)
set +e  # keep going to the report; the status is the group's
{
  set -e
  echo "# scripts/check-vllm-0.33.sh, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD)"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  start=$SECONDS
  { "$venv/bin/pip" install -q --no-cache-dir --upgrade pip
    "$venv/bin/pip" install -q --no-cache-dir -e ".[gpu]" "pytest>=8" "pytest-timeout>=2.3" "psutil>=5.9"
  } > "$log.pip" 2>&1 || { cat "$log.pip"; exit 1; }
  echo "install: $((SECONDS - start)) s, $(du -sh "$venv" | cut -f1) in $venv, $(df -Ph . | awk 'NR == 2 {print $4}') left free"
  "$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, '| torch', torch.__version__)"
  echo "## 1. unlock-serve --help"
  "$venv/bin/unlock-serve" --help > "$log.help" 2> "$log.err" || { cat "$log.err"; exit 1; }
  echo "exit 0, $(wc -l < "$log.help") lines; unlock-serve's own flags (--help=unlock-serve):"
  "$venv/bin/unlock-serve" --help=unlock-serve 2> /dev/null | grep -E "^  --"
  echo "## 2. seam, wiring and unit tests of tests/patches; the Triton kernels compiled for sm_80/sm_90"
  "$venv/bin/python" -m pytest tests/patches/test_seams.py tests/patches/test_units.py \
    tests/patches/test_triton_aot.py tests/patches/test_cuda_path.py tests/patches/test_capture_recorder.py \
    tests/server/test_start_refusals.py::test_start_does_not_ask_torch_for_a_gpu \
    -p no:cacheprovider -q -r fEp -o addopts="" 2>&1 | grep -vE "Warning|warnings.warn|^$"
} 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "${1:-}" = "--save" ]; then
  mkdir -p docs/checks && cp "$log" docs/checks/vllm-0.33.txt
fi
rm -f "$log" "$log".*
exit "$status"
