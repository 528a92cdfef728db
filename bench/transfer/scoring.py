"""GSM8K answer parsing, the JSON-answer format check, and the statistics of the transfer experiments (pure
functions, no I/O)."""

from __future__ import annotations

import json
import math
import re

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_MARKER = re.compile(r"<atok>\s*(.*?)\s*(?:</atok>|$)", re.S)
_FINAL = re.compile(r"final answer is[:\s]*\$?\\?(?:boxed\{)?\s*(" + _NUMBER + ")", re.I)
_BOXED = re.compile(r"\\boxed\{\s*\$?(" + _NUMBER + r")")


def normalise_number(text: str) -> str | None:
    """'1,200.50' -> '1200.5', '7.0' -> '7'; None when `text` holds no number."""
    match = re.search(_NUMBER, text)
    if match is None:
        return None
    value = match.group(0).replace(",", "")
    try:
        number = float(value)
    except ValueError:
        return None
    if not math.isfinite(number):  # hundreds of digits (a runaway answer): compare as written
        return value.lstrip("0") or "0"
    return str(int(number)) if number == int(number) else repr(number)


def parse_answer(completion: str) -> str | None:
    """The model's final answer: the marker, 'final answer is N', \\boxed{N}, else the last number.

    The locked (direct) format ends with a marker; reasoning outputs often end with a boxed value or
    prose, so the last number in the text is the fallback the paper's evaluation also uses.
    """
    for pattern in (_MARKER, _FINAL, _BOXED):
        found = pattern.findall(completion)
        for candidate in found:
            number = normalise_number(candidate)
            if number is not None:
                return number
    numbers = re.findall(_NUMBER, completion)
    return normalise_number(numbers[-1]) if numbers else None


def gold_answer(solution: str) -> str:
    """GSM8K gold solutions end with '#### N' (thousands separators possible)."""
    tail = solution.split("####")[-1]
    number = normalise_number(tail)
    if number is None:
        raise ValueError(f"no number after '####' in gold solution: {solution[-80:]!r}")
    return number


def json_answer(completion: str) -> tuple[bool, str | None]:
    """The JSON-answer capability's check, judgement-free: whether the text holds a JSON object with an
    "answer" key (the first such object counts), and that answer as a normalised number (None if none)."""
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(completion) if ch == "{"):
        try:
            value, _ = decoder.raw_decode(completion, start)
        except ValueError:
            continue
        if isinstance(value, dict) and "answer" in value:
            return True, normalise_number(str(value["answer"]))
    return False, None


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (sane at small counts, unlike the normal one)."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts (b: only A right, c: only B right)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_change(base: dict[int, bool], other: dict[int, bool]) -> str:
    """`other` against `base` on the items both answered (index -> correct): gained, lost, exact McNemar p."""
    common = base.keys() & other.keys()
    gained = sum(other[i] and not base[i] for i in common)
    lost = sum(base[i] and not other[i] for i in common)
    return f"{gained} gained, {lost} lost, p = {mcnemar_exact(gained, lost):.2g}"
