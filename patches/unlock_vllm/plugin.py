"""The `vllm.general_plugins` entry point `unlock`: runs in every vLLM process, possibly more than once.

It wraps the model-runner choice, the worker's model load, both model runners' per-request and per-step
methods (`runners`) and, for the scheduler, the block-hash helper. Nothing here changes behaviour until
an engine sets `additional_config["unlock"]` (see `unlock_vllm.engine_kwargs`), except the block hash of
requests that carry a steering selection. No environment variable is set: the runner of a steering engine
is chosen from its own config, and other engines keep vLLM's choice.
"""

from __future__ import annotations

import logging
import os

from unlock_vllm import seams

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's configured "vllm" logger

_registered = False
registration_error: str | None = None  # why wiring failed in this process (a vLLM seam is missing)


def register() -> None:
    global _registered, registration_error
    if _registered:
        return
    _registered = True
    try:
        seams.check(seams.WORKER_SEAMS)
        from unlock_vllm import prefix_cache, runners

        runners.wire()
        prefix_cache.wire()
    except (seams.MissingSeam, RuntimeError) as exc:
        # vLLM calls plugins in every process, engines that never ask for steering included: leave them
        # alone. A steering engine cannot start here: unlock-serve checks the seams before its engine
        # starts, and `unlock_status` reports this error to anyone who built an engine by hand.
        registration_error = str(exc)
        logger.error("unlock: plugin not wired in process %d: %s", os.getpid(), exc)
        return
    logger.info("unlock: plugin registered in process %d (runners wired, block hashes keyed)", os.getpid())
