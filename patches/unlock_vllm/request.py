"""The request wire format: which capabilities a request switches on, as one JSON string.

`SamplingParams.extra_args["unlock"]` carries ``[["<sha256>", <strength>, "<mode>"], ...]`` sorted by sha256.
A string (not a nested list) because the OpenAI field ``vllm_xargs`` only passes flat values. The same
string is the request's steering fingerprint in the KV block hash, so the encoding must be canonical:
sorted entries, floats as JSON writes them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable

EXTRA_ARGS_KEY = "unlock"
MODES = ("rotate", "add")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Selection = list[tuple[str, float, str]]


def _check_entry(sha256: object, strength: object, mode: object) -> tuple[str, float, str]:
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise ValueError(f"capability id {sha256!r} is not a lowercase hex sha256 (64 characters)")
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
        raise ValueError(f"strength {strength!r} for capability {sha256[:12]} must be a finite number")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} for capability {sha256[:12]} must be one of {MODES}")
    return sha256, float(strength), mode


def encode_selection(entries: Iterable[tuple[str, float, str]]) -> str:
    """[(sha256, strength, mode), ...] -> the canonical JSON string for ``extra_args["unlock"]``."""
    checked = sorted(_check_entry(*entry) for entry in entries)
    shas = [sha for sha, _, _ in checked]
    if len(set(shas)) != len(shas):
        raise ValueError(f"a capability is selected twice in {shas}; select each capability once")
    return json.dumps([list(entry) for entry in checked], separators=(",", ":"))


def decode_selection(text: str) -> Selection:
    """Parse and validate ``extra_args["unlock"]``; raises ValueError naming what is malformed."""
    if not isinstance(text, str):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be a JSON string, got {type(text).__name__}")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] is not JSON ({exc}): {text[:80]!r}") from None
    if not isinstance(raw, list) or not all(isinstance(e, list) and len(e) == 3 for e in raw):
        raise ValueError(
            f"extra_args[{EXTRA_ARGS_KEY!r}] must be a list of [sha256, strength, mode]: {text[:80]!r}"
        )
    return [_check_entry(*entry) for entry in raw]
