"""The grammar of one capability choice, `NAME[@STRENGTH][:POSITIONS]`, read and written in one place.

People write it in `unlockctl chat -c`, in `<model>+name@s:positions` model names and in the client's
helpers; the server reads model names with this parser and writes its `x-unlock-capabilities` header with
`format_spec`. It lives in the client package because the client must not import torch or vLLM, and the
server can import the client. Only the form is checked here: whether the strength is finite and allowed,
and whether the positions name one of `unlock.ops.POSITIONS`, is the server's to say.
"""

from __future__ import annotations

import reprlib
from typing import NamedTuple

FORM = "NAME[@STRENGTH][:POSITIONS]"

_short = reprlib.Repr()
_short.maxstring = 40  # a message quotes what it was given, but never a whole oversized model name


class Spec(NamedTuple):
    name: str
    strength: float | None = None  # None: the capability's default strength
    positions: str | None = None  # None: the capability's own (last_prompt, prompt, generated or all)


class SpecError(ValueError):
    """A choice not of the form `NAME[@STRENGTH][:POSITIONS]`; the message says what to write."""


def parse_spec(spec: str) -> Spec:
    """`NAME`, `NAME@STRENGTH`, `NAME:POSITIONS` or `NAME@STRENGTH:POSITIONS` into a `Spec`."""
    head, colon, positions = spec.partition(":")
    name, at, raw = head.partition("@")
    if not name:
        raise SpecError(f"empty capability name in {_short.repr(spec)}; write {FORM}")
    if colon and not positions:
        raise SpecError(
            f"empty positions in {_short.repr(spec)}; write NAME:generated, for example, or leave out the "
            "colon for the capability's own"
        )
    strength = None
    if at:
        try:
            strength = float(raw)
        except ValueError:
            raise SpecError(
                f"strength of capability {_short.repr(name)} must be a number, got {_short.repr(raw)}; "
                "write NAME@0.15, for example"
            ) from None
    return Spec(name, strength, positions or None)


def format_spec(spec: Spec) -> str:
    """The written form of a choice; `parse_spec` reads it back (the strength to `%g`'s 6 digits)."""
    strength = "" if spec.strength is None else f"@{spec.strength:g}"
    return spec.name + strength + (f":{spec.positions}" if spec.positions else "")
