"""Capability selections for the `openai` SDK: `extra_body={"capabilities": ...}` or `+name@s` model names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# The capabilities a request chooses, as a person writes them: names or NAME@STRENGTH specs, or a
# {name: strength} mapping (None: the capability's default). The server parses the same into `Choice`s.
Choices = Iterable[str] | Mapping[str, float | None]


def _items(choices: Choices) -> list[tuple[str, float | None]]:
    if isinstance(choices, Mapping):
        return [(str(name), strength) for name, strength in choices.items()]
    return [parse_spec(spec) for spec in choices]


def parse_spec(spec: str) -> tuple[str, float | None]:
    """`NAME` or `NAME@STRENGTH` (what `unlockctl chat --capability` takes)."""
    name, sep, raw = spec.partition("@")
    if not name:
        raise ValueError(f"empty capability name in {spec!r}; write NAME or NAME@STRENGTH")
    if not sep:
        return name, None
    try:
        return name, float(raw)
    except ValueError:
        raise ValueError(f"strength in {spec!r} is not a number; write NAME@0.15") from None


def capabilities_extra_body(choices: Choices, **extra: Any) -> dict[str, Any]:
    """`extra_body` for `client.chat.completions.create(...)`: names (default strengths), `NAME@s`
    specs, or a {name: strength} mapping; `extra` adds other vLLM fields."""
    items = _items(choices)
    field: list[Any] = [name if s is None else {"name": name, "strength": s} for name, s in items]
    return {"capabilities": field, **extra}


def model_with_capabilities(model: str, choices: Choices) -> str:
    """The `<model>+name@s` form for clients that cannot send extra body fields."""
    parts = [name if s is None else f"{name}@{s:g}" for name, s in _items(choices)]
    return "+".join([model, *parts])
