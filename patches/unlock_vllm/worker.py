"""`UnlockWorkerExtension`: RPCs mixed into every vLLM worker (`worker_extension_cls`).

Called through `collective_rpc`, so each reaches every TP/PP rank (and every DP engine). Each returns a
plain dict and never raises into the engine: errors come back as {"ok": False, "error": "..."}.
"""

from __future__ import annotations

import logging
from typing import Any

from unlock_vllm.runners import STATE_ATTR

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's configured "vllm" logger

_NOT_INSTALLED = (
    "steering is not installed in this worker: start the engine with unlock_vllm.engine_kwargs() "
    "and make sure the 'unlock' plugin is allowed by VLLM_PLUGINS"
)


class UnlockWorkerExtension:
    def _unlock_state(self) -> Any:
        return getattr(getattr(self, "model_runner", None), STATE_ATTR, None)

    def unlock_register(self, path: str, sha256: str) -> dict[str, Any]:
        state = self._unlock_state()
        if state is None:
            return {"ok": False, "error": _NOT_INSTALLED}
        try:
            return state.registry.register(path, sha256)
        except Exception as exc:  # any failure is the caller's to report, never the engine's to die of
            logger.error("unlock: register %s (%s) failed: %s", path, sha256, exc)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def unlock_unregister(self, sha256: str) -> dict[str, Any]:
        state = self._unlock_state()
        if state is None:
            return {"ok": False, "error": _NOT_INSTALLED}
        try:
            return state.registry.unregister(sha256)
        except Exception as exc:
            logger.error("unlock: unregister %s failed: %s", sha256, exc)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def unlock_status(self) -> dict[str, Any]:
        state = self._unlock_state()
        if state is None:
            runner = getattr(self, "model_runner", None)
            return {
                "ok": False,
                "error": _NOT_INSTALLED,
                "wrapped_layers": 0,
                "runner": type(runner).__qualname__,
                "registered": [],
            }
        return {"ok": True, "error": None, **state.status()}
