"""Capability selections for the `openai` SDK: `extra_body={"capabilities": ...}` or `+name@s:positions` model
names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from unlock_client.spec import Spec, format_spec, parse_spec

# The capabilities a request chooses, as a person writes them: NAME[@STRENGTH][:POSITIONS] specs (`spec`), or
# a {name: strength} mapping (None: the capability's default).
Choices = Iterable[str] | Mapping[str, float | None]


def _items(choices: Choices) -> list[Spec]:
    if isinstance(choices, Mapping):
        return [Spec(str(name), strength) for name, strength in choices.items()]
    return [parse_spec(spec) for spec in choices]


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
    return "+".join([model, *(format_spec(spec) for spec in _items(choices))])
