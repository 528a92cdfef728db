"""Parse a request's capability selection: the `capabilities` body field and the model-name form,
`<served>+name@strength:positions` (each part read by the client's parser, `unlock_client.spec`, so both
sides share one grammar).

Pure functions with no registry access: they turn user input into `Choice`s or raise `APIError(400)`, and
check the values the grammar leaves open (strength limits, position names). Resolution against the
registry happens in `service.CapabilityService.resolve`.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from typing import Any

from unlock_client.spec import SpecError, parse_spec

from unlock.ops import POSITIONS

from .errors import APIError

PARAM = "capabilities"
FIELDS = ("name", "strength", "positions")  # of the object form of a selected capability


@dataclass(frozen=True)
class Choice:
    name: str
    strength: float | None  # None: the capability's default strength
    positions: str | None = None  # None: the capability's own (`unlock.ops.POSITIONS`)


def _bad(message: str) -> APIError:
    return APIError(400, message, param=PARAM)


_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother = 2, 40, 40


def _show(value: Any) -> str:
    """A bounded repr of user input: a message must not recurse into, or copy, whatever a client sent."""
    return _short.repr(value)


def check_strength(name: str, value: Any, max_abs: float) -> float:
    """A finite number within [-max_abs, max_abs], else a 400 naming the capability and the value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"strength of capability {_show(name)} must be a number, got {_show(value)}")
    strength = float(value)
    if not math.isfinite(strength) or abs(strength) > max_abs:
        raise _bad(
            f"strength of capability {_show(name)} must be finite and within ±{max_abs}, got {value!r}"
        )
    return strength


def check_positions(name: str, value: Any) -> str:
    if value not in POSITIONS:
        raise _bad(
            f"positions of capability {_show(name)} must be one of {list(POSITIONS)}, got {_show(value)}"
        )
    return value


def parse_field(value: Any, max_abs: float) -> list[Choice]:
    """The body field: `["cot"]`, `{"cot": 0.15}` or `[{"name": "cot", "strength": 0.15, "positions":
    "all"}]` (strength and positions optional)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [Choice(str(k), check_strength(str(k), v, max_abs)) for k, v in value.items()]
    if not isinstance(value, list):
        raise _bad(
            f"capabilities must be a list of names, a {{name: strength}} object or a list of "
            f'{{"name", "strength", "positions"}} objects, got {type(value).__name__}'
        )
    choices = []
    for item in value:
        if isinstance(item, str):
            choices.append(Choice(item, None))
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            name = item["name"]
            extra = set(item) - set(FIELDS)
            if extra:
                raise _bad(
                    f"unknown keys {_show(sorted(extra))} in capability {_show(name)}; expected {FIELDS}"
                )
            strength, positions = item.get("strength"), item.get("positions")
            choices.append(
                Choice(
                    name,
                    None if strength is None else check_strength(name, strength, max_abs),
                    None if positions is None else check_positions(name, positions),
                )
            )
        else:
            raise _bad(
                f'each capability must be a name or {{"name", "strength", "positions"}}, got {_show(item)}'
            )
    return choices


def parse_model_suffix(suffix: str, max_abs: float) -> list[Choice]:
    """`cot@0.15:all+math` (what follows `<served>+`) into choices: `name[@strength][:positions]` parts
    joined by `+`, the form of the `x-unlock-capabilities` header."""
    choices = []
    for part in suffix.split("+"):
        try:
            spec = parse_spec(part)
        except SpecError as err:
            raise _bad(f"model suffix {_show(suffix)}: {err}") from None
        strength = None if spec.strength is None else check_strength(spec.name, spec.strength, max_abs)
        positions = None if spec.positions is None else check_positions(spec.name, spec.positions)
        choices.append(Choice(spec.name, strength, positions))
    return choices


def split_model(model: str, served_names: list[str]) -> tuple[str, str]:
    """Split `model` into (base, suffix); a served name may itself contain '+', so try those first."""
    for served in served_names:
        if model == served:
            return served, ""
        if model.startswith(served + "+"):
            return served, model[len(served) + 1 :]
    base, _, suffix = model.partition("+")
    return base, suffix


def check_unique(choices: list[Choice]) -> None:
    seen: set[str] = set()
    for choice in choices:
        if choice.name in seen:
            raise _bad(f"capability {_show(choice.name)} is selected twice; select each capability once")
        seen.add(choice.name)
