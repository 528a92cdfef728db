"""The plugin's switch and settings, read from `vllm_config.additional_config["unlock"]`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CONFIG_KEY = "unlock"
DEFAULT_MAX_CAPABILITIES = 64


@dataclass(frozen=True)
class UnlockConfig:
    max_capabilities: int


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
    return UnlockConfig(max_capabilities=cap)
