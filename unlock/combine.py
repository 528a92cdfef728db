"""Capability arithmetic: weighted sums and negations of capabilities of one target, as one new capability.

`0.5*cot + math - verbose`, served at strength a, applies what the selection {cot: 0.5a, math: a,
verbose: -a} applies: the operator's table rows are summed with the weights and stored as they are
(`row_norm = stored`), so a `rotate` combination does not renormalise. Only modes whose capabilities
compose by summing rows combine (`Operator.combinable`): ablating a sum of directions is not the sum of the
ablations. Provenance is kept in the metadata (`combined_from`, `combine_expression`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from unlock.artifacts import Capability, TargetInfo
from unlock.ops import operator

_TERM = re.compile(r"^(?:(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\*)?(?P<name>[^*\s]+)$")


def parse_expression(text: str) -> list[tuple[float, str]]:
    """`0.5*cot + math - verbose` -> [(0.5, "cot"), (1.0, "math"), (-1.0, "verbose")].

    Operators stand between spaces (a name may contain '-'); a term is `[WEIGHT*]NAME`, and a leading '-'
    negates the first term.
    """
    tokens = text.split()
    if not tokens:
        raise ValueError("empty expression; write e.g. '0.5*cot + math - verbose'")
    terms, sign = [], 1.0
    expect_term = True
    for token in tokens:
        if expect_term:
            if token.startswith("-") and len(token) > 1 and not terms:
                sign, token = -sign, token[1:]
            match = _TERM.match(token)
            if match is None:
                raise ValueError(f"cannot read the term {token!r} in {text!r}; write [WEIGHT*]NAME")
            weight = float(match["weight"]) if match["weight"] else 1.0
            terms.append((sign * weight, match["name"]))
            expect_term = False
        elif token in ("+", "-"):
            sign, expect_term = (1.0 if token == "+" else -1.0), True
        else:
            raise ValueError(f"expected '+' or '-' before {token!r} in {text!r} (put spaces around them)")
    if expect_term:
        raise ValueError(f"{text!r} ends with an operator")
    return terms


def resolve(name: str) -> Path:
    """A term's file: the name as a path, else NAME.safetensors."""
    for path in (Path(name), Path(f"{name}.safetensors")):
        if path.is_file():
            return path
    raise ValueError(f"no capability file {name!r} or {name + '.safetensors'!r}")


def combine(
    terms: Sequence[tuple[float, Capability]],
    name: str,
    default_strength: float = 1.0,
    expression: str | None = None,
) -> Capability:
    """One capability applying sum_i w_i c_i at strength 1; ValueError naming what cannot combine."""
    if not terms:
        raise ValueError("nothing to combine")
    first = terms[0][1]
    spec = operator(first.mode)
    if not spec.combinable:
        raise ValueError(
            f"{spec.name} capabilities do not combine into one ({spec.composes}): select them together "
            "in a request instead"
        )
    target = (first.target_architecture, first.target_num_layers, first.target_hidden_size, first.target_name)
    seen: set[str] = set()
    for _, cap in terms:
        if cap.mode != first.mode:
            raise ValueError(f"{cap.name!r} is {cap.mode} but {first.name!r} is {first.mode}: one mode only")
        if cap.positions != first.positions:
            raise ValueError(
                f"{cap.name!r} edits {cap.positions} tokens but {first.name!r} edits {first.positions}"
            )
        other = (cap.target_architecture, cap.target_num_layers, cap.target_hidden_size, cap.target_name)
        if other != target:
            raise ValueError(
                f"{cap.name!r} was built for {other}, {first.name!r} for {target}: one target only"
            )
        if cap.sha256 in seen:
            raise ValueError(f"{cap.name!r} appears twice: write it once with the summed weight")
        seen.add(cap.sha256)
    num_layers, hidden = first.target_num_layers, first.target_hidden_size
    rows = torch.zeros(num_layers, hidden, dtype=torch.float64)  # [n_layers, d]
    for weight, cap in terms:
        rows[cap.layers] += weight * cap.table_rows().double()
    layers = [layer for layer in sorted({i for _, cap in terms for i in cap.layers}) if rows[layer].any()]
    if not layers:
        raise ValueError("the weighted sum is zero at every layer: nothing would be steered")
    metadata = {
        "positions": first.positions,
        "row_norm": "stored",
        "combined_from": json.dumps(
            [{"name": cap.name, "sha256": cap.sha256, "weight": weight} for weight, cap in terms]
        ),
    }
    if expression is not None:
        metadata["combine_expression"] = expression
    info = TargetInfo(*target)
    combined = Capability.from_directions(
        name, rows[layers].float(), layers, first.mode, default_strength, info, metadata
    )
    combined.validate()
    return combined
