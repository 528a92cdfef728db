"""Scheduler side: the steering fingerprint joins the KV block hash of the blocks steering changes.

Steered and unsteered runs of one prompt compute different KV from the first edited token on, so those
blocks must never be shared. vLLM hashes each full block from (parent hash, tokens, extra keys); we add
("unlock", fingerprint) to the extra keys of every block of a steered request that holds or follows an
edited token. Block hashes chain, so that separates every later block too. The fingerprint names
capabilities by sha256 with strengths, modes and positions, so re-registering a name with new content
never reuses blocks computed under the old content.

Which tokens are edited is each capability's positions (`unlock.ops`), so the rule is read from there:
- a block that ends before the first edited token (`first_edited`: the last prompt token for
  `last_prompt`, the first generated token for `generated`) holds the unsteered KV and keeps vLLM's own
  hash: steered requests share such blocks with unsteered ones and with each other;
- where the edited tokens of a block depend on where the prompt ends (`edits_depend_on_prompt_end`), the
  block also gets ("unlock_prompt_len", P): a follow-up turn whose prompt extends this prompt plus its
  answer then reuses the blocks before that boundary but never one edited differently in the new turn.
"""

from __future__ import annotations

import functools
from typing import Any

from unlock.ops import POSITIONS, edits_depend_on_prompt_end, first_edited
from unlock_vllm.request import EXTRA_ARGS_KEY, decode_selection
from unlock_vllm.wrapping import WRAPPED


def fingerprint(request: Any) -> str | None:
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    value = extra.get(EXTRA_ARGS_KEY)
    return value if isinstance(value, str) and value not in ("", "[]") else None


@functools.lru_cache(maxsize=4096)
def _positions(text: str) -> tuple[str, ...]:
    """The positions of every selected capability; malformed input (the worker runs it unsteered) counts
    as every position, so that keying more blocks is the safe side."""
    try:
        return tuple(positions for *_, positions in decode_selection(text))
    except ValueError:
        return POSITIONS


def steering_keys(request: Any, end_token_idx: int) -> tuple[tuple[Any, ...], ...]:
    """The extra block-hash keys for the block of `request` ending at `end_token_idx` (exclusive)."""
    key = fingerprint(request)
    if key is None:
        return ()
    prompt_len = request.num_prompt_tokens
    positions = _positions(key)
    if end_token_idx <= min(first_edited(p, prompt_len) for p in positions):
        return ()  # no edited token up to here: the block holds the unsteered KV
    if any(edits_depend_on_prompt_end(p, end_token_idx, prompt_len) for p in positions):
        return ((EXTRA_ARGS_KEY, key), ("unlock_prompt_len", prompt_len))
    return ((EXTRA_ARGS_KEY, key),)


def _with_fingerprint(original):
    @functools.wraps(original)
    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm_idx = original(request, start_token_idx, end_token_idx, start_mm_idx)
        extra = steering_keys(request, end_token_idx)
        if not extra:
            return keys, next_mm_idx
        return (*(keys or ()), *extra), next_mm_idx

    setattr(generate_block_hash_extra_keys, WRAPPED, True)
    return generate_block_hash_extra_keys


def wire() -> None:
    """Wrap the helper in `kv_cache_utils` and rebind the name modules imported from it (idempotent)."""
    import importlib

    from unlock_vllm import seams

    kv_cache_utils = seams.get("kv_cache_utils")

    original = kv_cache_utils.generate_block_hash_extra_keys
    if getattr(original, WRAPPED, False):
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
