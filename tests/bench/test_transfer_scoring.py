"""bench/transfer/scoring.py: what the transfer experiment's GSM8K rows and their tests stand on (the answer
parser, the gold answers, Wilson intervals, the exact McNemar test), checked against worked values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "transfer"))
from scoring import (  # noqa: E402
    gold_answer,
    json_answer,
    mcnemar_exact,
    normalise_number,
    paired_change,
    parse_answer,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("<atok>18", "18"),
        ("<atok> 1,200.50 </atok> and then 7", "1200.5"),
        # The direct format's answer is the first number after the marker, not a later one in an expression.
        ("<atok>2 + (2/2) = 2 + 1 = 3", "2"),
        ("Step 1: 4 * 5 = 20. So the final answer is: $36.", "36"),
        ("... = 12, which gives \\boxed{ 48 } eggs, 3 left", "48"),
        ("She sells 9 eggs at $2 each, earning 18 dollars.", "18"),
        ("7.0 apples", "7"),
        ("no number here", None),
        ("<atok>" + "9" * 400, "9" * 400),  # a runaway answer is compared as written, not through a float
    ],
)
def test_parse_answer(completion, answer):
    assert parse_answer(completion) == answer


def test_gold_answers_and_numbers():
    assert gold_answer("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 1,080") == "1080"
    assert normalise_number("-0.50") == "-0.5"
    with pytest.raises(ValueError, match="no number"):
        gold_answer("#### none")


@pytest.mark.parametrize(
    "completion, found",
    [
        ('{"answer": 42}', (True, "42")),
        ('Sure. {"answer": "1,200"} done', (True, "1200")),
        ('{"reasoning": "3 + 4", "answer": 7.0}\n{"answer": 9}', (True, "7")),
        ('{"result": 5} then {"answer": 6}', (True, "6")),  # the first object with the key counts
        ('{"answer": "unknown"}', (True, None)),  # the format holds, the answer is not a number
        ('{"answer": 5', (False, None)),  # unterminated
        ("{'answer': 5}", (False, None)),  # not JSON
        ("The answer is <atok>5</atok>", (False, None)),
        ("[5, 6]", (False, None)),
    ],
)
def test_json_answer(completion, found):
    assert json_answer(completion) == found


def test_wilson_interval_matches_worked_values():
    assert wilson_interval(3, 200) == pytest.approx((0.00512, 0.04313), abs=5e-5)
    assert wilson_interval(47, 200) == pytest.approx((0.18157, 0.29841), abs=5e-5)
    assert wilson_interval(0, 0) == (0.0, 0.0)


def test_mcnemar_exact_is_the_two_sided_binomial_tail():
    assert mcnemar_exact(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 0.109, the earlier run
    assert mcnemar_exact(2, 8) == mcnemar_exact(8, 2)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(1, 1) == 1.0
    assert mcnemar_exact(46, 2) == pytest.approx(8.4e-12, rel=0.02)  # the unlock row of docs/RESULTS.md


def test_paired_change_counts_discordant_items_on_the_items_both_rows_answered():
    base = {0: True, 1: False, 2: False, 3: True, 4: False}
    other = {0: True, 1: True, 2: True, 3: False, 5: True}  # 4 unanswered here, 5 not in base: both ignored
    assert paired_change(base, other) == f"2 gained, 1 lost, p = {mcnemar_exact(2, 1):.2g}"
    assert paired_change(other, base) == f"1 gained, 2 lost, p = {mcnemar_exact(1, 2):.2g}"
