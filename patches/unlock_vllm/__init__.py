"""unlock_vllm: the vLLM plugin that applies registered capabilities per request (see docs/patch.md)."""

from __future__ import annotations

from typing import Any

from unlock.validation import DEFAULT_MAX_STRENGTH
from unlock_vllm.config import CONFIG_KEY, DEFAULT_MAX_CAPABILITIES, DEFAULT_MODEL_RUNNER, MODEL_RUNNERS

WORKER_EXTENSION = "unlock_vllm.worker.UnlockWorkerExtension"


def engine_kwargs(
    max_capabilities: int = DEFAULT_MAX_CAPABILITIES,
    model_runner: str = DEFAULT_MODEL_RUNNER,
    max_strength: float = DEFAULT_MAX_STRENGTH,
) -> dict[str, Any]:
    """Keyword arguments to merge into `AsyncEngineArgs(...)` / `LLM(...)` to switch steering on.

    `additional_config["unlock"]` is both the switch the workers read and part of vLLM's config hash, so a
    torch.compile cache built without the steering hooks is never loaded for a steered engine. It also
    picks this engine's model runner (`model_runner`), leaving every other engine's choice to vLLM, and
    carries the server's strength limit, which the workers' artifact validator applies (`max_strength`).
    """
    if max_capabilities < 1:
        raise ValueError(f"max_capabilities={max_capabilities} must be >= 1")
    if model_runner not in MODEL_RUNNERS:
        raise ValueError(f"model_runner={model_runner!r} must be one of {MODEL_RUNNERS}")
    return {
        "worker_extension_cls": WORKER_EXTENSION,
        "additional_config": {
            CONFIG_KEY: {
                "version": 1,
                "max_capabilities": int(max_capabilities),
                "model_runner": model_runner,
                "max_strength": float(max_strength),
            }
        },
    }
