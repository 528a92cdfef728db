"""`UnlockWorkerExtension`: RPCs mixed into every vLLM worker (`worker_extension_cls`).

Called through `collective_rpc`, so each reaches every TP/PP rank (and every DP engine). Each returns a
plain dict and never raises into the engine: errors come back as {"ok": False, "error": "..."}.
"""

from __future__ import annotations

import logging
from typing import Any

from unlock.validation import ArtifactError
from unlock_vllm.registry import RegistryFull
from unlock_vllm.state import STATE_ATTR

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's configured "vllm" logger

_NOT_INSTALLED = (
    "steering is not installed in this worker: start the engine with unlock_vllm.engine_kwargs() "
    "and make sure the 'unlock' plugin is allowed by VLLM_PLUGINS"
)


def _not_installed() -> str:
    from unlock_vllm import plugin

    if plugin.registration_error:
        return f"steering is not installed in this worker: {plugin.registration_error}"
    return _NOT_INSTALLED


def _kind(exc: Exception) -> str:
    if isinstance(exc, ArtifactError):
        return "invalid"
    return "full" if isinstance(exc, RegistryFull) else "error"


class UnlockWorkerExtension:
    def _unlock_state(self) -> Any:
        return getattr(getattr(self, "model_runner", None), STATE_ATTR, None)

    def _unlock_where(self) -> dict[str, Any]:
        """Which engine and rank answered: with data parallelism, replies come from every engine."""
        parallel = getattr(getattr(self, "vllm_config", None), "parallel_config", None)
        # data_parallel_index: the engine's DP rank even where vLLM runs dense-model DP ranks as independent
        # DP=1 engines (data_parallel_rank is then 0 in every engine).
        dp_rank = getattr(parallel, "data_parallel_index", getattr(parallel, "data_parallel_rank", 0))
        return {"dp_rank": dp_rank, "rank": getattr(self, "rank", 0)}

    def unlock_register(self, path: str, sha256: str) -> dict[str, Any]:
        """Validate (the artifact validator, with the engine's strength limit and the model dtype) and
        register. A refusal says its `kind`: "invalid" (the artifact), "full" (the registry), "error"."""
        state = self._unlock_state()
        if state is None:
            return {"ok": False, "error": _not_installed(), "kind": "error"}
        try:
            return state.registry.register(path, sha256)
        except Exception as exc:  # any failure is the caller's to report, never the engine's to die of
            logger.error("unlock: register %s (%s) failed: %s", path, sha256, exc)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "kind": _kind(exc)}

    def unlock_unregister(self, sha256: str) -> dict[str, Any]:
        state = self._unlock_state()
        if state is None:
            return {"ok": False, "error": _not_installed()}
        try:
            return state.registry.unregister(sha256)
        except Exception as exc:
            logger.error("unlock: unregister %s failed: %s", sha256, exc)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def unlock_capture_take(self, capture_id: str) -> dict[str, Any]:
        """The rows this worker recorded for capture call `capture_id`, forgotten here (`capture.Recorder`):
        safetensors bytes, empty when it recorded none (another TP rank, stage or engine did)."""
        state = self._unlock_state()
        if state is None:
            return {"ok": False, "error": _not_installed()}
        try:
            return {"ok": True, "error": None, "data": state.capture.take(capture_id), **self._unlock_where()}
        except Exception as exc:
            logger.error("unlock: capture %s failed: %s", capture_id, exc)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def unlock_status(self) -> dict[str, Any]:
        state = self._unlock_state()
        if state is None:
            runner = getattr(self, "model_runner", None)
            return {
                "ok": False,
                "error": _not_installed(),
                "wrapped_layers": 0,
                "runner": type(runner).__qualname__,
                "registered": [],
                **self._unlock_where(),
            }
        return {"ok": True, "error": None, **state.status(), **self._unlock_where()}
