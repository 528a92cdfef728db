"""The one validator of capability artifacts: what makes a capability applicable, in one place.

`Capability` runs `check_steering` on every construction (a loaded capability is always a valid instance of
its operator); `Capability.validate(num_layers, hidden_size, limits)` adds the facts of a deployment: the
model it must fit and the limits on strengths and values. The CLI (`inspect`, `build`, `align`, `combine`,
`generate`), the server (uploads and registry reloads) and the engine's workers (registration) all call
`validate`, so an artifact one of them accepts the others accept too: the worker only knows one more fact,
the model dtype, which can only make the value limit tighter (float16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unlock.ops import MODES, OPERATORS, POSITIONS, table_rows

DEFAULT_MAX_STRENGTH = 10.0  # the server's UNLOCK_MAX_STRENGTH default: strengths are within ±this
# The server's UNLOCK_MAX_UPLOAD_BYTES default (its settings keep their own copy, read before torch loads;
# a test holds the two equal): factors of a near-full-rank map exceed it, and `unlock align` says so.
DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024
# Largest |strength x table-row entry| a capability may reach. Far beyond any residual stream (entries of
# at most ~1e4), and small enough that sums of a few such terms, and the squares that norms and RMSNorm
# take, stay finite in float32 and bfloat16.
MAX_STEER_VALUE = 1e6


@dataclass(frozen=True)
class Limits:
    """The limits a deployment applies: the largest |strength| and the dtype its steering tables use."""

    max_strength: float = DEFAULT_MAX_STRENGTH
    dtype: torch.dtype = torch.float32

    @property
    def max_value(self) -> float:
        # float16's range (65504) is far smaller: keep a margin for the stream the value is added to.
        return min(MAX_STEER_VALUE, torch.finfo(self.dtype).max / 16)


DEFAULT_LIMITS = Limits()


class ArtifactError(ValueError):
    """A capability file or capability that is malformed, or that does not fit the model it is used with."""


def check_steering(
    mode: str, positions: str | None, row_norm: str | None, layers: list[int], directions: torch.Tensor
) -> None:
    """What every capability must be: a known operator, positions and row norm for it (None: the mode's
    default), and a non-zero finite direction and table row at every layer it lists (a layer whose row is
    zero steers nothing: leave it out)."""
    if mode not in OPERATORS:
        raise ArtifactError(f"unknown mode {mode!r}; expected one of {MODES}")
    positions = positions or OPERATORS[mode].default_positions
    row_norm = row_norm or OPERATORS[mode].row_norms[0]
    if positions not in POSITIONS:
        raise ArtifactError(f"unknown positions {positions!r}; expected one of {POSITIONS}")
    accepted = OPERATORS[mode].row_norms
    if row_norm not in accepted:
        raise ArtifactError(
            f"row_norm {row_norm!r} is not valid for mode {mode!r}; expected one of {accepted}"
        )
    if not torch.isfinite(directions).all():
        raise ArtifactError("target directions are non-finite (NaN/Inf)")
    zero = [layer for layer, row in zip(layers, directions, strict=True) if not row.any()]
    if len(zero) == len(layers):
        raise ArtifactError("every target direction is zero: this capability would steer nothing")
    if zero:
        raise ArtifactError(
            f"the target direction of layer(s) {zero} is zero: drop them from `layers` (a capability lists "
            "exactly the layers it steers)"
        )
    rows = table_rows(directions, row_norm)
    if not torch.isfinite(rows).all() or not rows.any(-1).all():
        raise ArtifactError("a target direction gives a non-finite or zero table row (too large or small)")


def check_limits(name: str, default_strength: float, table_rows: torch.Tensor, limits: Limits) -> None:
    """The default strength obeys the limit requests get, and every value the tables can produce at the
    largest strength is finite with room to spare."""
    if not math.isfinite(default_strength) or abs(default_strength) > limits.max_strength:
        raise ArtifactError(
            f"default_strength {default_strength:g} of capability {name!r} is outside "
            f"±{limits.max_strength:g}, the limit every request's strength obeys: rebuild it with a smaller "
            "--strength"
        )
    largest = float(table_rows.abs().max())
    if not largest * limits.max_strength <= limits.max_value:
        raise ArtifactError(
            f"capability {name!r} would steer by up to {largest * limits.max_strength:.3g} (strength "
            f"{limits.max_strength:g} x its largest direction entry {largest:.3g}); at most "
            f"{limits.max_value:.3g} keeps every served value finite in "
            f"{str(limits.dtype).removeprefix('torch.')}: scale the directions down"
        )
