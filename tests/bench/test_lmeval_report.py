"""bench/lmeval/report.py: issue 23's goals and the MATH goal line, read off paired rows."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "lmeval"))
from report import goals, math_goal  # noqa: E402


def row(correct: set[int], n: int = 100, metric: str = "flexible-extract") -> dict[int, dict]:
    return {i: {"text": "", "scores": {metric: i in correct}} for i in range(n)}


def test_goals_are_met_only_where_the_rows_show_them():
    rows = {
        "direct": row(set(range(5))),
        "unlock": row(set(range(30))),  # +25 points, 25 gained, 0 lost
        "control-random": row(set(range(6))),  # +1 point
        "control-mean-axis": row(set(range(10))),  # +5 of unlock's +25
        "same-model": row(set(range(32))),  # 32%: its interval holds unlock's 30%
    }
    lines = goals(rows, "flexible-extract")
    assert lines[1].startswith("- unlock >= direct + 15 points") and lines[1].endswith(": met")
    assert lines[2].endswith(": met") and lines[3].endswith(": met")
    assert lines[4].startswith("- moonshot") and lines[4].endswith(": met")
    rows["control-random"] = row(set(range(9)))  # +4 points: outside 2
    rows["same-model"] = row(set(range(60)))  # far above unlock
    lines = goals(rows, "flexible-extract")
    assert lines[2].endswith("NOT met") and lines[4].endswith("NOT met")
    rows["unlock"] = row(set(range(15)))  # +10 points
    assert goals(rows, "flexible-extract")[1].endswith("NOT met")


def test_the_label_best_line_compares_gains():
    rows = {"direct": row(set()), "unlock": row(set(range(20))), "unlock-label-best": row(set(range(24)))}
    line = next(text for text in goals(rows, "flexible-extract") if "label-best" in text)
    assert "83% of +24.0%" in line and line.endswith(": met")


def test_the_math_goal_is_judged_per_metric():
    direct = {i: {"text": "", "scores": {"math_verify": False, "exact_match": i < 8}} for i in range(200)}
    unlock = {i: {"text": "", "scores": {"math_verify": i < 20, "exact_match": i < 10}} for i in range(200)}
    lines = math_goal({"direct": direct, "unlock": unlock}, ["math_verify", "exact_match"])
    assert lines[1].startswith("- math_verify: 20 gained, 0 lost") and lines[1].endswith(": met")
    assert lines[2].startswith("- exact_match: 2 gained, 0 lost") and lines[2].endswith("NOT met")
    assert math_goal({"direct": direct}, ["math_verify"]) == []
