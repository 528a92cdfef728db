"""Load questions from a JSONL file: one JSON object per line, the question under a named field."""

from __future__ import annotations

import json
from pathlib import Path


def load_questions(path: str | Path, field: str = "question", n: int | None = None) -> list[str]:
    """The first ``n`` (all when None) values of ``field``; errors name the file, line and fix.

    Every line is checked, not only the first n, so a broken file fails before any model runs.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    questions: list[str] = []
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: not valid JSON ({err.msg}); each line must be one object"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if field not in record:
                raise ValueError(
                    f"{path}:{lineno}: no field {field!r} (fields: {sorted(record)}); choose one with --field"
                )
            value = record[field]
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{path}:{lineno}: field {field!r} must be a non-empty string, got {value!r}"
                )
            questions.append(value)
    if not questions:
        raise ValueError(f"data file {str(path)!r} holds no records")
    if n is not None and len(questions) < n:
        raise ValueError(f"data file {str(path)!r} holds {len(questions)} records, fewer than -n {n}")
    return questions if n is None else questions[:n]
