"""Scheduler side: the steering fingerprint joins the KV block hash of steered requests.

Steered and unsteered runs of one prompt compute different KV, so they must never share blocks. vLLM
hashes each full block from (parent hash, tokens, extra keys); we add ("unlock", fingerprint) to the
extra keys of every block of a steered request. Block hashes chain, so block 0 alone would already
separate everything downstream; adding it to every block also keeps KV events self-describing. The
fingerprint names capabilities by sha256, so re-registering a name with new content never reuses
blocks computed under the old content.

`rotate` edits the last prompt token only, so the KV of the block holding it (and of every later block)
also depends on WHERE the prompt ends: a follow-up turn whose prompt extends this prompt plus its answer
must not reuse the block that was rotated in the middle of its own prompt. Those blocks get
("unlock_last_prompt_token", P - 1) as well.
"""

from __future__ import annotations

import functools
from typing import Any

from unlock_vllm.request import EXTRA_ARGS_KEY, decode_selection

_WRAPPED = "__unlock_wrapped__"


def fingerprint(request: Any) -> str | None:
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    value = extra.get(EXTRA_ARGS_KEY)
    return value if isinstance(value, str) and value not in ("", "[]") else None


def _rotates(text: str) -> bool:
    try:
        return any(mode == "rotate" for _, _, mode in decode_selection(text))
    except ValueError:
        return True  # malformed (the worker runs it unsteered): keying more blocks is the safe side


def steering_keys(request: Any, end_token_idx: int) -> tuple[tuple[Any, ...], ...]:
    """The extra block-hash keys for the block of `request` ending at `end_token_idx` (exclusive)."""
    key = fingerprint(request)
    if key is None:
        return ()
    last_prompt = request.num_prompt_tokens - 1
    if end_token_idx > last_prompt and _rotates(key):
        return ((EXTRA_ARGS_KEY, key), ("unlock_last_prompt_token", last_prompt))
    return ((EXTRA_ARGS_KEY, key),)


def _with_fingerprint(original):
    @functools.wraps(original)
    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm_idx = original(request, start_token_idx, end_token_idx, start_mm_idx)
        extra = steering_keys(request, end_token_idx)
        if not extra:
            return keys, next_mm_idx
        return (*(keys or ()), *extra), next_mm_idx

    setattr(generate_block_hash_extra_keys, _WRAPPED, True)
    return generate_block_hash_extra_keys


def wire() -> None:
    """Wrap the helper in `kv_cache_utils` and rebind the name modules imported from it (idempotent)."""
    import importlib

    from unlock_vllm import seams

    kv_cache_utils = seams.get("kv_cache_utils")

    original = kv_cache_utils.generate_block_hash_extra_keys
    if getattr(original, _WRAPPED, False):
        return
    wrapped = _with_fingerprint(original)
    kv_cache_utils.generate_block_hash_extra_keys = wrapped
    for module_name in ("vllm.v1.core.block_pool", "vllm.v1.simple_kv_offload.manager"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # absent in this vLLM version
        if getattr(module, "generate_block_hash_extra_keys", None) is original:
            module.generate_block_hash_extra_keys = wrapped
