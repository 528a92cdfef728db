"""Capability selections for the `openai` SDK: `extra_body={"capabilities": ...}` or `+name@s:positions` model
names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

# The capabilities a request chooses, as a person writes them: NAME[@STRENGTH][:POSITIONS] specs, or a
# {name: strength} mapping (None: the capability's default). The server parses the same into `Choice`s.
Choices = Iterable[str] | Mapping[str, float | None]


class Spec(NamedTuple):
    name: str
    strength: float | None = None  # None: the capability's default strength
    positions: str | None = None  # None: the capability's own (last_prompt, prompt, generated or all)


def _items(choices: Choices) -> list[Spec]:
    if isinstance(choices, Mapping):
        return [Spec(str(name), strength) for name, strength in choices.items()]
    return [parse_spec(spec) for spec in choices]


def parse_spec(spec: str) -> Spec:
    """`NAME`, `NAME@STRENGTH`, `NAME:POSITIONS` or `NAME@STRENGTH:POSITIONS` (what `unlockctl chat
    --capability` takes, and the form of the `x-unlock-capabilities` header). The server checks the values."""
    head, colon, positions = spec.partition(":")
    name, sep, raw = head.partition("@")
    if not name:
        raise ValueError(f"empty capability name in {spec!r}; write NAME[@STRENGTH][:POSITIONS]")
    if colon and not positions:
        raise ValueError(f"empty positions in {spec!r}; write NAME:generated, for example")
    strength = None
    if sep:
        try:
            strength = float(raw)
        except ValueError:
            raise ValueError(f"strength in {spec!r} is not a number; write NAME@0.15") from None
    return Spec(name, strength, positions or None)


def capabilities_extra_body(choices: Choices, **extra: Any) -> dict[str, Any]:
    """`extra_body` for `client.chat.completions.create(...)`: names (default strengths), specs, or a
    {name: strength} mapping; `extra` adds other vLLM fields."""
    field: list[Any] = []
    for spec in _items(choices):
        chosen = {key: value for key, value in spec._asdict().items() if value is not None}
        field.append(spec.name if len(chosen) == 1 else chosen)
    return {"capabilities": field, **extra}


def model_with_capabilities(model: str, choices: Choices) -> str:
    """The `<model>+name@s:positions` form for clients that cannot send extra body fields."""
    parts = []
    for name, strength, positions in _items(choices):
        parts.append(
            name + ("" if strength is None else f"@{strength:g}") + (f":{positions}" if positions else "")
        )
    return "+".join([model, *parts])
