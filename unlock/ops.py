"""The steering operators: one spec per mode, the positions they edit, and the reference math.

Everything that differs between modes is written down once here and read by the HF reference
(`unlock.steering`), the engine's CPU kernel (`unlock_vllm.steer_op`, which runs `steer_hidden`), the fused
Triton kernel (`unlock_vllm.triton_steer`, the same math per token row, checked against `steer_hidden`),
the artifact validator (`unlock.validation`), the block-hash keys (`unlock_vllm.prefix_cache`) and the docs.
Adding a mode means one `Operator` here plus its branch in `steer_hidden` and in the Triton kernel.

Per layer, with s the residual stream after the decoder layer and r_i the table row of capability i:
- ``ablate``: s <- s - sum_i a_i (s . r_i) r_i            r_i unit; a = 1 removes the component
- ``add``:    s <- s + sum_i a_i r_i                      r_i as stored
- ``rotate``: s <- |s| u / |u|,  u = s/|s| + sum_i a_i r_i  r_i unit (the paper's operator)
A layer applies ablate, then add, then rotate; every ablation is measured on the stream that enters the
layer's steering, so ablations compose as a sum of projections (order-free, and exact for orthogonal
directions). Which tokens a capability edits is its *positions* (`POSITIONS`), not its mode; each mode only
has a default.

Tables (the engine's are fixed-address tensors; the HF reference builds the same ones per batch):
- ``dirs`` [C, d]: table row of capability c at this layer; row 0 is zero.
- ``gate`` [C] float32: 1 where capability c steers this layer, else 0 (a capability steers its own layers
  only: rotating by a zero row would be the identity only up to rounding).
- ``term_cap`` int64 [R, J], ``term_strength`` float32 [R, J], ``term_op`` int64 [R, J]: term row r lists up
  to J (capability, strength, operator code) terms; capability 0 means no term. Row 0 is empty.
- ``token_row`` int64 [>= T]: the term row of each token of the step; 0 = not steered.
Requests with the same selection share term rows, so their composition is done once per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# -- positions: which tokens a capability edits ----------------------------------------------------------
# A token of a request is one of three classes: a prompt token before the last one, the last prompt token,
# or a generated token (one fed back in decode, at position >= prompt length).
PROMPT, LAST_PROMPT, GENERATED = 0, 1, 2
TOKEN_CLASSES = (PROMPT, LAST_PROMPT, GENERATED)
COVERS = {
    "last_prompt": (LAST_PROMPT,),
    "prompt": (PROMPT, LAST_PROMPT),
    "generated": (GENERATED,),
    "all": (PROMPT, LAST_PROMPT, GENERATED),
}
POSITIONS = tuple(COVERS)


def first_edited(positions: str, prompt_len: int) -> int:
    """The first token position a selector edits: KV before it is the unsteered KV (shareable)."""
    return {"last_prompt": prompt_len - 1, "generated": prompt_len}.get(positions, 0)


def edits_depend_on_prompt_end(positions: str, end: int, prompt_len: int) -> bool:
    """Whether which tokens of [0, end) are edited depends on where the prompt ends (prefix-cache rule: a
    follow-up turn whose prompt extends this one must then not reuse the block)."""
    if positions == "all":
        return False
    if positions == "last_prompt":
        return end > prompt_len - 1
    return end > prompt_len  # prompt / generated: the boundary between edited and unedited tokens


# -- operators -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Operator:
    name: str
    code: int  # in the term tables; the order in which one layer applies the modes
    equation: str
    composes: str  # how several capabilities of this mode combine in one request
    default_positions: str
    row_norms: tuple[str, ...]  # accepted `row_norm` of an artifact; the first is the default
    combinable: bool  # `unlock combine`: a weighted sum of such capabilities is one capability of the mode


ABLATE = Operator(
    "ablate",
    1,
    "s <- s - a (s . r) r, r unit",
    "projections summed, each measured on the stream that enters the layer",
    "all",
    ("unit",),
    False,  # ablating a sum of directions is not the sum of the ablations
)
ADD = Operator("add", 2, "s <- s + a r", "rows summed", "all", ("stored",), True)
ROTATE = Operator(
    "rotate",
    3,
    "s <- |s| u/|u|, u = s/|s| + a r, r unit",
    "unit rows summed inside u",
    "last_prompt",
    ("unit", "stored"),  # stored: a combination of unit rows, kept as combined (`unlock combine`)
    True,
)
OPERATORS = {op.name: op for op in (ROTATE, ADD, ABLATE)}
MODES = tuple(OPERATORS)
BY_CODE = {op.code: op for op in OPERATORS.values()}


def operator(mode: str) -> Operator:
    try:
        return OPERATORS[mode]
    except KeyError:
        raise ValueError(f"unknown steering mode {mode!r}; expected one of {MODES}") from None


def table_rows(directions: torch.Tensor, row_norm: str) -> torch.Tensor:
    """A capability's directions [L, d] as its table rows, float32: unit rows, or as stored.

    Normalised in float64, so a direction whose float32 norm would overflow still gives its unit row."""
    if row_norm == "unit":
        rows = directions.double()
        return (rows / rows.norm(dim=-1, keepdim=True)).float()
    if row_norm == "stored":
        return directions.to(torch.float32, copy=True)
    raise ValueError(f"unknown row_norm {row_norm!r}; expected 'unit' or 'stored'")


# -- requests as term rows -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Term:
    """One capability switched on for one request: its table row, strength, operator and positions."""

    cap: int  # row in `dirs`
    strength: float
    op: int  # Operator.code
    positions: str

    def __post_init__(self) -> None:
        if self.positions not in COVERS:
            raise ValueError(f"unknown positions {self.positions!r}; expected one of {POSITIONS}")


def class_terms(terms: Sequence[Term]) -> tuple[tuple[tuple[int, float, int], ...], ...]:
    """The (cap, strength, op) terms active on each token class (PROMPT, LAST_PROMPT, GENERATED).

    Equal tuples are equal term rows: requests with the same selection share them, and a request whose
    terms cover every class uses one row for all its tokens.
    """
    return tuple(
        tuple((t.cap, t.strength, t.op) for t in terms if cls in COVERS[t.positions]) for cls in TOKEN_CLASSES
    )


def token_classes(prompt_len: int, start: int, count: int) -> list[int]:
    """The class of each of `count` tokens starting at position `start` (for layouts built token by token)."""
    return [
        PROMPT if p < prompt_len - 1 else LAST_PROMPT if p == prompt_len - 1 else GENERATED
        for p in range(start, start + count)
    ]


# -- the reference math --------------------------------------------------------------------------------
def _compose(weight: torch.Tensor, caps: torch.Tensor, dirs: torch.Tensor, inverse: torch.Tensor):
    """sum_j weight[:, j] * dirs[caps[:, j]] for each token's term row, float32 [n, d].

    Composed once per row and gathered when rows are shared; per token when most tokens have rows of their
    own (nothing to share, and a gather fewer). Elementwise float32 either way, so the two agree bit for bit.
    """
    per_token = 2 * len(weight) > len(inverse)
    if per_token:
        weight, caps = weight[inverse], caps[inverse]
    total = None
    for j in range(caps.shape[1]):
        if weight[:, j].any():
            term = weight[:, j, None] * dirs[caps[:, j]].float()
            total = term if total is None else total + term
    return total if per_token else total[inverse]


def steer_hidden(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    dirs: torch.Tensor,
    gate: torch.Tensor,
    term_cap: torch.Tensor,
    term_strength: torch.Tensor,
    term_op: torch.Tensor,
    token_row: torch.Tensor,
) -> torch.Tensor:
    """Apply one layer's steering to a flat batch of tokens; returns a new ``hidden`` (never aliased).

    hidden, residual: [T, d]; the stream is hidden + residual (vLLM's decoder layers return the two
    separately; residual=None when ``hidden`` is the stream, as in HF models). Tables as in the module
    docstring; ``token_row`` may be longer than T (a fixed-address buffer). All arithmetic is float32 and
    the result is rounded to the hidden's dtype once. A token whose row has no live term at this layer
    (strength 0, or no capability of it steers the layer) comes back bit for bit.

    Data-dependent (it steers only the tokens that need it, composes each shared term row once, and skips
    operators with no live term): the CPU kernel and the HF reference run it as is; the Triton kernel
    computes the same per token.
    """
    num_tokens = hidden.shape[0]
    row = token_row[:num_tokens]
    tokens = row.nonzero().squeeze(-1)  # [n]
    if tokens.numel() == 0:
        return hidden.clone()
    used, inverse = row[tokens].unique(return_inverse=True)  # [U], [n]
    caps = term_cap[used]  # [U, J]
    weight = term_strength[used].float() * gate[caps].float()  # [U, J]; 0 where nothing is steered
    op = term_op[used]  # [U, J]
    w_ablate, w_add, w_rotate = (torch.where(op == o.code, weight, 0.0) for o in (ABLATE, ADD, ROTATE))
    ablated, added, rotated = ((w != 0).any(-1) for w in (w_ablate, w_add, w_rotate))  # [U] each
    edited = ablated | added
    if not (edited.any() or rotated.any()):
        return hidden.clone()
    every = tokens.numel() == num_tokens  # the usual `add` step: no gather and scatter of the batch
    h = (hidden if every else hidden[tokens]).float()  # [n, d]
    res = None
    if residual is not None and (ablated.any() or rotated.any()):  # `add` alone never needs the stream
        res = (residual if every else residual[tokens]).float()

    if edited.any():
        edit = _compose(w_add, caps, dirs, inverse) if added.any() else torch.zeros_like(h)  # [n, d]
        if ablated.any():
            stream = h if res is None else h + res
            for j in range(caps.shape[1]):  # coefficients from the incoming stream, one column at a time
                if w_ablate[:, j].any():
                    unit = dirs[caps[inverse, j]].float()  # [n, d]
                    edit = edit - (w_ablate[inverse, j] * (stream * unit).sum(-1)).unsqueeze(-1) * unit
        h = h + edit if bool(edited.all()) else torch.where(edited[inverse].unsqueeze(-1), h + edit, h)

    if rotated.any():
        stream = h if res is None else h + res
        norm = stream.norm(dim=-1, keepdim=True)  # [n, 1]
        u = stream / norm.clamp_min(1e-30) + _compose(w_rotate, caps, dirs, inverse)
        turned = norm * u / u.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        if res is not None:
            turned = turned - res
        h = turned if bool(rotated.all()) else torch.where(rotated[inverse].unsqueeze(-1), turned, h)

    touched = edited | rotated  # [U]
    if every and bool(touched.all()):
        return h.to(hidden.dtype) if h.data_ptr() != hidden.data_ptr() else hidden.clone()
    out = hidden.clone()
    steered = hidden if every else hidden[tokens]
    out[tokens] = torch.where(touched[inverse].unsqueeze(-1), h.to(hidden.dtype), steered)
    return out
