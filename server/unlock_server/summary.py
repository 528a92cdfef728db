"""The per-layer summary `GET /v1/capabilities/{name}` adds: for each steered layer, the norm of its target
direction, the source layer it was mapped from and the alignment's held-out error (what `unlock inspect`
prints as a table). Computed from the blob once per content: a sha256 names immutable bytes."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any


def _finite(value: Any) -> float | None:
    # JSON has no NaN: an unknown error is null.
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


@lru_cache(maxsize=256)
def layer_summary(path: Path, sha256: str) -> tuple[dict[str, Any], ...]:
    """One row per steered layer; `sha256` keys the cache (the caller's path holds that content)."""
    from unlock import Capability

    capability = Capability.from_bytes(path.read_bytes())
    count = len(capability.layers)
    meta = capability.metadata
    sources = json.loads(meta["source_layers"]) if "source_layers" in meta else [None] * count
    errors = capability.alignment_errors or [None] * count
    norms = capability.target_directions().norm(dim=-1).tolist()  # [len(layers)]
    return tuple(
        {"layer": int(layer), "source_layer": source, "norm": _finite(norm), "alignment_error": _finite(err)}
        for layer, source, norm, err in zip(capability.layers, sources, norms, errors, strict=True)
    )
