"""Replacing a vLLM method by a wrapper at run time, once: the one way every wiring module patches vLLM.

The plugin may load more than once per process, so each wrapper carries `WRAPPED`, and a method already
wrapped is left alone. A method that is missing fails loudly, naming the vLLM version (`seams`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

from unlock_vllm import seams

WRAPPED = "__unlock_wrapped__"  # the attribute that marks a wrapper of ours

# make(original) -> the wrapper that replaces it
MakeWrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


def wrap(cls: type | ModuleType, name: str, make: MakeWrapper) -> None:
    """Replace `cls.name` (a method, or a module's function) by `make(original)`, once."""
    original = cls.__dict__.get(name)
    if original is None:
        where = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else cls.__name__
        raise RuntimeError(
            f"unlock: {where}.{name} does not exist in "
            f"{seams.vllm_version()}; unlock-serve supports {seams.SUPPORTED}"
        )
    if getattr(original, WRAPPED, False):
        return
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, WRAPPED, True)
    setattr(cls, name, wrapper)


def wrap_property(cls: type, name: str, make: MakeWrapper) -> None:
    """Replace the getter of property `cls.name` by `make(original getter)`, once."""
    original = cls.__dict__.get(name)
    if not isinstance(original, property):
        raise RuntimeError(f"unlock: {cls.__module__}.{cls.__qualname__}.{name} is not a property here")
    if getattr(original.fget, WRAPPED, False):
        return
    getter = functools.wraps(original.fget)(make(original.fget))
    setattr(getter, WRAPPED, True)
    setattr(cls, name, property(getter))
