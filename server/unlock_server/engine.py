"""The one place the server touches the vLLM plugin (`unlock_vllm`) and the engine's worker RPCs.

Worker RPCs return one plain dict per worker (`{"ok": bool, "error": str | None, ...}`); a registration
counts only when every worker (all TP/PP ranks, all DP engines) says ok; `collective_rpc_every_engine`
asks every data-parallel engine, where AsyncLLM's own collective_rpc asks the first one only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from unlock_vllm.request import EXTRA_ARGS_KEY

__all__ = [
    "EXTRA_ARGS_KEY",  # the key of `vllm_xargs` that carries the wire selection, defined by the plugin
    "EngineRPCError",
    "Workers",
    "capture_params",
    "check_engine_config",
    "encode_selection",
    "engine_kwargs",
]

logger = logging.getLogger(__name__)


class EngineRPCError(RuntimeError):
    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind  # the workers' `kind`: "invalid" (the artifact), "full" (the registry) or "error"


def engine_kwargs(model_runner: str | None = None, max_strength: float | None = None) -> dict[str, Any]:
    """Engine arguments that load the plugin's worker extension (merged into `AsyncEngineArgs`); the
    workers validate registrations with the same strength limit as the server (`max_strength`)."""
    import unlock_vllm

    options: dict[str, Any] = {}
    if model_runner is not None:
        options["model_runner"] = model_runner
    if max_strength is not None:
        options["max_strength"] = max_strength
    return unlock_vllm.engine_kwargs(**options)


def check_engine_config(vllm_config: Any) -> None:
    """ValueError naming every engine feature steering does not support (before the engine starts)."""
    from unlock_vllm.runners import refuse_unsupported

    refuse_unsupported(vllm_config)


def encode_selection(items: Sequence[tuple[str, float, str]]) -> str:
    """[(sha256, strength, mode), ...] into the `vllm_xargs[EXTRA_ARGS_KEY]` string the workers decode."""
    from unlock_vllm.request import encode_selection as encode

    return encode(list(items))


class Workers:
    """Capability registration on every worker of one `AsyncLLM`."""

    def __init__(self, engine: Any):
        self.engine = engine

    async def _call(self, method: str, *args: Any) -> list[dict[str, Any]]:
        from unlock_vllm.seams import collective_rpc_every_engine

        results = await collective_rpc_every_engine(self.engine, method, args)
        return [
            r if isinstance(r, dict) else {"ok": False, "error": f"unexpected reply {r!r}"} for r in results
        ]

    async def register(self, path: str, sha256: str) -> None:
        """Register on every worker; each validates as the server does, with its model dtype besides."""
        results = await self._call("unlock_register", path, sha256)
        failed = [r for r in results if not r.get("ok")]
        if failed:
            kinds = {r.get("kind", "error") for r in failed}
            raise EngineRPCError(
                f"registering {sha256[:12]} failed on {len(failed)}/{len(results)} workers: "
                f"{failed[0].get('error') or 'unknown error'}",
                kinds.pop() if len(kinds) == 1 else "error",
            )

    async def unregister(self, sha256: str) -> None:
        results = await self._call("unlock_unregister", sha256)
        errors = [r.get("error") or "unknown error" for r in results if not r.get("ok")]
        if errors:
            logger.warning("unregistering %s failed on %d workers: %s", sha256[:12], len(errors), errors[0])

    async def status(self) -> list[dict[str, Any]]:
        return await self._call("unlock_status")

    async def capture_take(self, capture_id: str) -> list[bytes]:
        """Every worker's rows of capture call `capture_id` (safetensors bytes, empty where it recorded
        none); EngineRPCError if a worker failed it."""
        results = await self._call("unlock_capture_take", capture_id)
        failed = [r for r in results if not r.get("ok")]
        if failed:
            raise EngineRPCError(
                f"capture failed on {len(failed)}/{len(results)} workers: {failed[0].get('error')}"
            )
        return [r.get("data") or b"" for r in results]


def capture_params(capture_id: str, index: int, layers: list[int], positions: str) -> Any:
    """The sampling params of one prompt of a capture call: unsteered, greedy, one token, marked for the
    workers' recorder (`unlock_vllm.capture`)."""
    from unlock_vllm.capture import CAPTURE_KEY, capture_args
    from vllm import SamplingParams

    extra = {CAPTURE_KEY: capture_args(capture_id, index, layers, positions)}
    return SamplingParams(temperature=0.0, max_tokens=1, extra_args=extra)
