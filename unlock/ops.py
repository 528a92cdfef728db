"""The steering math, shared by the HF reference (`unlock.steering`) and the vLLM patch (`unlock_vllm`).

One definition, so the engine is tested against exactly the equations it runs:

- ``add``:    s <- s + sum_i a_i r_i                                   at every token
- ``rotate``: s <- |s| * u / |u|,  u = s/|s| + sum_i a_i r_i / |r_i|   at the last prompt token only

where s is the residual stream after a decoder layer. ``add`` is applied first, then ``rotate``.
Per-request sums are composed once (`compose_rows`) into table rows; row 0 of every table is zero and
means "not steered", so a forward only gathers rows by a per-token index and never branches in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MODES = ("rotate", "add")


@dataclass(frozen=True)
class SteeringTerm:
    """One capability switched on for one request: its target directions and the strength asked for."""

    mode: str
    strength: float
    layers: Sequence[int]  # target layer indices, one per row of `directions`
    directions: torch.Tensor  # [len(layers), hidden]


def compose_rows(
    terms: Sequence[SteeringTerm], num_layers: int, hidden_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum a request's capabilities into one ``add`` row and one ``rotate`` row per layer.

    Returns (add_rows, rot_rows), each float32 [num_layers, hidden_size]; layers a capability does not
    steer get zeros. ``rotate`` directions enter unit-normalised (the paper's u = s/|s| + a r/|r|).
    """
    add_rows = torch.zeros(num_layers, hidden_size, dtype=torch.float32)
    rot_rows = torch.zeros(num_layers, hidden_size, dtype=torch.float32)
    for term in terms:
        if term.mode not in MODES:
            raise ValueError(f"unknown steering mode {term.mode!r}; expected one of {MODES}")
        dirs = term.directions.to(torch.float32)
        if term.mode == "rotate":
            dirs = dirs / dirs.norm(dim=-1, keepdim=True)
            rows = rot_rows
        else:
            rows = add_rows
        for row, layer in zip(dirs, term.layers, strict=True):
            rows[layer] += term.strength * row
    return add_rows, rot_rows


def steer_hidden(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    add_table: torch.Tensor,
    rot_table: torch.Tensor,
    add_index: torch.Tensor,
    rot_index: torch.Tensor,
) -> torch.Tensor:
    """Apply one layer's steering to a flat batch of tokens; returns the new ``hidden``.

    hidden, residual: [T, d]; the stream is hidden + residual (vLLM's decoder layers return the two
    separately; pass residual=None when ``hidden`` already is the stream, as in HF models).
    add_table, rot_table: [R, d] with row 0 zero. add_index, rot_index: int64 [>= T], sliced to T here so
    the caller can keep them preallocated at a fixed address. Unsteered tokens come back bit-identical:
    both edits are selected with ``where`` (adding a zero row would turn -0.0 into +0.0).
    Pure tensor ops, no Python branch on data: safe under torch.compile and CUDA-graph capture.
    """
    num_tokens = hidden.shape[0]
    add_rows = add_table[add_index[:num_tokens]].to(hidden.dtype)  # [T, d]
    rot_rows = rot_table[rot_index[:num_tokens]]  # [T, d]
    hidden = torch.where((add_index[:num_tokens] > 0).unsqueeze(-1), hidden + add_rows, hidden)
    stream = hidden.float() if residual is None else (hidden + residual).float()
    norm = stream.norm(dim=-1, keepdim=True)  # [T, 1]
    direction = stream / norm.clamp_min(1e-30) + rot_rows.float()
    rotated = norm * direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    if residual is not None:
        rotated = rotated - residual.float()
    rotated_hidden = rotated.to(hidden.dtype)
    steered = (rot_index[:num_tokens] > 0).unsqueeze(-1)  # [T, 1]
    return torch.where(steered, rotated_hidden, hidden)
