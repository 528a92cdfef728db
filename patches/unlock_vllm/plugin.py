"""The `vllm.general_plugins` entry point `unlock`: runs in every vLLM process, possibly more than once.

It pins vLLM's V1 model runner (the one the steering hooks are wired into; `runner_v1.install` fails
loudly if another runner is in use), wraps the V1 runner/worker methods, and, for the scheduler,
the block-hash helper. Nothing here changes behaviour until an engine sets `additional_config["unlock"]`
(see `unlock_vllm.engine_kwargs`), except the block hash of requests that carry a steering selection.
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
    # The V2 runner (vLLM's GPU default from 0.33) is not wired; an explicit user choice of V2 is kept
    # and then refused at model load with a clear error.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from unlock_vllm import prefix_cache, runner_v1

    runner_v1.wire()
    prefix_cache.wire()
    _registered = True
    logger.info("unlock: plugin registered in process %d (V1 runner wired, block hashes keyed)", os.getpid())
