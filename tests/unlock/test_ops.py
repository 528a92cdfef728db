"""The operator specs and the reference math `steer_hidden`, against the equations written out in float64."""

from __future__ import annotations

import pytest
import torch

from unlock.ops import (
    ABLATE,
    ADD,
    BY_CODE,
    GENERATED,
    LAST_PROMPT,
    OPERATORS,
    POSITIONS,
    PROMPT,
    ROTATE,
    Term,
    class_terms,
    edits_depend_on_prompt_end,
    first_edited,
    steer_hidden,
    table_rows,
)

D = 16


def test_every_operator_spec_is_complete_and_distinct():
    assert [op.code for op in (ABLATE, ADD, ROTATE)] == sorted(op.code for op in OPERATORS.values())
    assert len({op.code for op in OPERATORS.values()}) == len(OPERATORS)
    for op in OPERATORS.values():
        assert op.default_positions in POSITIONS and op.row_norms and op.equation and op.composes
    assert ROTATE.default_positions == "last_prompt" and ADD.default_positions == "all"
    assert not ABLATE.combinable and ADD.combinable and ROTATE.combinable


def test_positions_and_their_prefix_cache_rule():
    prompt_len = 10
    assert [first_edited(p, prompt_len) for p in POSITIONS] == [9, 0, 10, 0]
    # A block [0, end) whose edited tokens depend on where the prompt ends:
    assert not edits_depend_on_prompt_end("all", 64, prompt_len)
    assert not edits_depend_on_prompt_end("last_prompt", 9, prompt_len)
    assert edits_depend_on_prompt_end("last_prompt", 10, prompt_len)
    assert not edits_depend_on_prompt_end("prompt", 10, prompt_len)  # every token of it is a prompt token
    assert edits_depend_on_prompt_end("prompt", 11, prompt_len)
    assert edits_depend_on_prompt_end("generated", 11, prompt_len)


def test_class_terms_give_equal_rows_for_equal_selections():
    add_all = Term(1, 0.5, ADD.code, "all")
    rot_last = Term(2, 0.1, ROTATE.code, "last_prompt")
    gen = Term(3, -1.0, ABLATE.code, "generated")
    rows = class_terms([add_all, rot_last, gen])
    assert rows[PROMPT] == ((1, 0.5, ADD.code),)
    assert rows[LAST_PROMPT] == ((1, 0.5, ADD.code), (2, 0.1, ROTATE.code))
    assert rows[GENERATED] == ((1, 0.5, ADD.code), (3, -1.0, ABLATE.code))
    assert len(set(class_terms([add_all]))) == 1  # `all` everywhere: one row for every token
    with pytest.raises(ValueError, match="unknown positions"):
        Term(1, 1.0, ADD.code, "middle")


def _tables(seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(5, D, generator=g) * 2  # capabilities 1..4 (row 0 zero)
    raw[0] = 0
    dirs = raw.clone()
    dirs[[1, 3]] = table_rows(raw[[1, 3]], "unit")  # 1: rotate, 2: add, 3: ablate, 4: add (not this layer)
    gate = torch.tensor([0.0, 1, 1, 1, 0])
    # term rows: 1 = add; 2 = rotate + add; 3 = ablate + add + rotate; 4 = add of a capability off this layer
    term_cap = torch.tensor([[0, 0, 0], [2, 0, 0], [1, 2, 0], [3, 2, 1], [4, 0, 0]])
    term_strength = torch.tensor([[0, 0, 0], [0.5, 0, 0], [0.7, -0.3, 0], [1.0, 0.2, 0.4], [3.0, 0, 0]])
    term_op = torch.tensor([[0, 0, 0], [2, 0, 0], [3, 2, 0], [1, 2, 3], [2, 0, 0]])
    return dirs, gate, term_cap, term_strength, term_op


def _equations(h, res, dirs, gate, term_cap, term_strength, term_op, row):
    """One token, float64, straight from the module docstring's equations."""
    s = (h + (0 if res is None else res)).double()
    terms = [
        (BY_CODE[int(op)], float(a) * float(gate[c]), dirs[c].double())
        for c, a, op in zip(term_cap[row], term_strength[row], term_op[row], strict=True)
        if c > 0 and float(a) * float(gate[c]) != 0
    ]
    if not terms:
        return h.double()
    s0 = s.clone()
    for op, a, r in terms:
        if op is ABLATE:
            s = s - a * (s0 @ r) * r
    for op, a, r in terms:
        if op is ADD:
            s = s + a * r
    rot = [a * r for op, a, r in terms if op is ROTATE]
    if rot:
        u = s / s.norm() + sum(rot)
        s = s.norm() * u / u.norm()
    return s - (0 if res is None else res.double())


@pytest.mark.parametrize("with_residual", [True, False])
def test_steer_hidden_is_the_equations(with_residual):
    g = torch.Generator().manual_seed(1)
    tables = _tables()
    token_row = torch.tensor([0, 1, 2, 3, 4, 3, 1, 0, 0, 0])  # longer than T = 7: a fixed-address buffer
    hidden = torch.randn(7, D, generator=g)
    residual = torch.randn(7, D, generator=g) if with_residual else None
    out = steer_hidden(hidden, residual, *tables, token_row)
    for t in range(7):
        want = _equations(hidden[t], None if residual is None else residual[t], *tables, int(token_row[t]))
        torch.testing.assert_close(out[t].double(), want, rtol=1e-5, atol=1e-5)
    for t in (0, 4):  # row 0, and a row whose only capability does not steer this layer: bit for bit
        assert torch.equal(out[t], hidden[t])
    assert out.data_ptr() != hidden.data_ptr()


def test_strength_zero_and_bfloat16_leave_unsteered_bits():
    dirs, gate, term_cap, term_strength, term_op = _tables()
    hidden = torch.randn(4, D).to(torch.bfloat16)
    hidden[0, 0] = -0.0
    zero = torch.zeros_like(term_strength)
    out = steer_hidden(hidden, None, dirs, gate, term_cap, zero, term_op, torch.tensor([1, 2, 3, 0]))
    assert torch.equal(out, hidden) and out.dtype == torch.bfloat16
    assert torch.signbit(out[0, 0])  # an untouched -0.0 stays -0.0


def test_identical_rows_are_composed_once_and_agree():
    """Tokens of different requests pointing at one term row get exactly what each would alone."""
    tables = _tables(seed=2)
    hidden = torch.randn(6, D)
    together = steer_hidden(hidden, None, *tables, torch.tensor([3, 3, 2, 3, 1, 3]))
    for t, row in enumerate([3, 3, 2, 3, 1, 3]):
        alone = steer_hidden(hidden[t : t + 1], None, *tables, torch.tensor([row]))
        assert torch.equal(together[t], alone[0])


def test_table_rows_normalise_in_float64():
    huge = torch.full((2, D), 3e38)
    assert torch.isfinite(table_rows(huge, "unit")).all()
    torch.testing.assert_close(table_rows(huge, "unit").norm(dim=-1), torch.ones(2))
    assert torch.equal(table_rows(huge, "stored"), huge)
    with pytest.raises(ValueError, match="row_norm"):
        table_rows(huge, "scaled")
