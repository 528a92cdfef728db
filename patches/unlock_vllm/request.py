"""The request wire format: which capabilities a request switches on, as one JSON string.

`SamplingParams.extra_args["unlock"]` carries ``[["<sha256>", <strength>, "<mode>", "<positions>"], ...]``
sorted by sha256, at most `MAX_SELECTED` entries. A string (not a nested list) because the OpenAI field
``vllm_xargs`` only passes flat values. The same string is the request's steering fingerprint in the KV
block hash, so the encoding must be canonical: sorted entries, floats as JSON writes them, positions always
written. A hand-written entry may leave positions out: the mode's default applies.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence

from unlock.ops import MODES, OPERATORS, POSITIONS

EXTRA_ARGS_KEY = "unlock"
# Capabilities one request may select: the width of the engine's term tables (`unlock.ops`).
MAX_SELECTED = 8
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

WireEntry = tuple[str, float, str, str]  # (sha256, strength, mode, positions)
WireSelection = list[WireEntry]


def _check_entry(entry: Sequence[object]) -> WireEntry:
    if not 3 <= len(entry) <= 4:
        raise ValueError(f"a selection entry is [sha256, strength, mode, positions], got {list(entry)!r:.80}")
    sha256, strength, mode = entry[:3]
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise ValueError(f"capability id {sha256!r:.80} is not a lowercase hex sha256 (64 characters)")
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
        raise ValueError(f"strength {strength!r:.40} for capability {sha256[:12]} must be a finite number")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r:.40} for capability {sha256[:12]} must be one of {MODES}")
    positions = entry[3] if len(entry) == 4 else OPERATORS[str(mode)].default_positions
    if positions not in POSITIONS:
        raise ValueError(
            f"positions {positions!r:.40} for capability {sha256[:12]} must be one of {POSITIONS}"
        )
    return sha256, float(strength), str(mode), str(positions)


def encode_selection(entries: Iterable[Sequence[object]]) -> str:
    """[(sha256, strength, mode[, positions]), ...] -> the canonical ``extra_args["unlock"]`` string."""
    checked = sorted(_check_entry(entry) for entry in entries)
    shas = [entry[0] for entry in checked]
    if len(set(shas)) != len(shas):
        raise ValueError(f"a capability is selected twice in {shas}; select each capability once")
    if len(checked) > MAX_SELECTED:
        raise ValueError(f"{len(checked)} capabilities selected; a request may select at most {MAX_SELECTED}")
    return json.dumps([list(entry) for entry in checked], separators=(",", ":"))


def decode_selection(text: str) -> WireSelection:
    """Parse and validate ``extra_args["unlock"]``; raises ValueError naming what is malformed."""
    if not isinstance(text, str):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be a JSON string, got {type(text).__name__}")
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] is not JSON ({exc}): {text[:80]!r}") from None
    if not isinstance(raw, list) or not all(isinstance(e, list) for e in raw):
        raise ValueError(
            f"extra_args[{EXTRA_ARGS_KEY!r}] must be a list of [sha256, strength, mode, positions]: "
            f"{text[:80]!r}"
        )
    if len(raw) > MAX_SELECTED:
        raise ValueError(f"{len(raw)} capabilities selected; a request may select at most {MAX_SELECTED}")
    return [_check_entry(entry) for entry in raw]
