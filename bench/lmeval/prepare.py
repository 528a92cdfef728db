"""Write the fresh evaluation items that tasks/*.yaml read, and show they are disjoint from what the
project has used.

- GSM8K test items 200-699: items 0-199 were evaluated during development (issue 14) and items 1000-1079
  tuned strengths; nothing in the project has read 200-699.
- 200 MATH test problems: items 600-799 of the file. The extraction prompts are items 0-63 (`unlock extract
  -n 64`, and `unlock calibrate -n 32` reads 0-31), the alignment corpus is drawn from items 1000-4999
  (bench/transfer/capture.py); the check below compares problem texts with both, not only indices.

Needs `bench/fetch_assets.py --only data`. Usage: .venv/bin/python bench/lmeval/prepare.py
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "transfer"))
from capture import build_corpus  # noqa: E402  (the alignment corpus, rebuilt the same way when absent)

DATA = REPO / "bench" / "cache" / "data"
OUT = DATA / "lmeval"
GSM8K_FRESH = range(200, 700)
MATH_FRESH = range(600, 800)
MATH_EXTRACTION = range(0, 64)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"{path.relative_to(REPO)}: {len(rows)} items")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    gsm8k, math = read(DATA / "gsm8k_test.jsonl"), read(DATA / "math_test.jsonl")
    fresh_math = [math[i] for i in MATH_FRESH]
    align = build_corpus(DATA / "math_test.jsonl", DATA / "align_math.jsonl")
    used = {math[i]["problem"] for i in MATH_EXTRACTION} | {row["question"] for row in read(align)}
    overlap = [row["id"] for row in fresh_math if row["problem"] in used]
    if overlap:
        raise SystemExit(f"fresh MATH items overlap the extraction/alignment texts: {overlap[:5]}")
    span = f"{MATH_FRESH.start}-{MATH_FRESH.stop - 1}"
    print(f"MATH {span}: none of its problems is among the {len(used)} extraction/alignment texts")
    write(OUT / "gsm8k_fresh.jsonl", [gsm8k[i] for i in GSM8K_FRESH])
    write(OUT / "math_fresh.jsonl", fresh_math)


if __name__ == "__main__":
    main()
