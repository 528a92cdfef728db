"""The long captures of the token-level alignment experiment (issue 14): resumable, for later fits.

1. The alignment corpus: MATH test problems outside the first 1000 of the file (the extraction prompts come
   from the start of it: `run.py` uses the first -n), without diagrams, at most 500 characters, in a seeded
   random order; written once to <cache>/data/align_math.jsonl. It shares no item with GSM8K, where every
   evaluated and tuning item lies.
2. The steps, in the order given (`unlock capture` keeps the chunks a killed run finished, and finished
   extractions are skipped, so a rerun resumes): MODEL:N captures every token's stream of MODEL on the first
   N texts with the `direct` template, into <cache>/streams; extract:MODEL runs `unlock extract` of MODEL on
   the first 64 MATH test problems (direct vs cot), into <cache>/extracted/MODEL-math64.safetensors.

  nice -n 15 .venv/bin/python bench/transfer/capture.py \\
      qwen05:256 smollm2:256 extract:smollm2 extract:qwen05 qwen15:256 extract:qwen15 \\
      qwen05:512 qwen15:512 smollm2:512
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "bench" / "cache"
UNLOCK = REPO / ".venv" / "bin" / "unlock"
RESERVED = 1000  # MATH test items kept for extraction prompts
MAX_CHARS = 500


def build_corpus(math_test: Path, out: Path, seed: int = 0) -> Path:
    """The alignment texts (field `question`), written once; the same inputs give the same file."""
    if out.is_file():
        return out
    records = [json.loads(line) for line in math_test.read_text(encoding="utf-8").splitlines() if line]
    texts = [
        {"id": r["id"], "question": r["problem"]}
        for r in records[RESERVED:]
        if len(r["problem"]) <= MAX_CHARS and "[asy]" not in r["problem"]
    ]
    random.Random(seed).shuffle(texts)
    partial = out.with_suffix(".partial")
    partial.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    partial.replace(out)
    return out


def run(cmd: list[str], log: Path) -> bool:
    """Run one step, its output appended to ``log``; a failed step is reported and the next ones still run."""
    print("$", " ".join(cmd), flush=True)
    with log.open("a") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        print(f"failed with exit status {code}; see {log}", flush=True)
    return code == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("steps", nargs="+", metavar="MODEL:N|extract:MODEL")
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    corpus = build_corpus(args.cache / "data" / "math_test.jsonl", args.cache / "data" / "align_math.jsonl")
    logs = args.cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    failed = []
    for step in args.steps:
        kind, item = step.split(":")
        if kind == "extract":
            out = args.cache / "extracted" / f"{item}-math64.safetensors"
            if out.exists():
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            ok = run(
                [str(UNLOCK), "extract", "--source-locked", str(args.cache / "models" / item),
                 "--data", str(args.cache / "data" / "math_test.jsonl"), "--field", "problem", "-n", "64",
                 "--locked-template", "direct", "--unlocked-template", "cot", "--aggregation", "mean",
                 "--batch-size", str(args.batch_size), "--device", "cpu", "--record-paths", "-o", str(out)],
                logs / f"extract-{item}.log",
            )  # fmt: skip
        else:
            model, n = kind, item
            ok = run(
                [str(UNLOCK), "capture", "--model", str(args.cache / "models" / model), "--data", str(corpus),
                 "--field", "question", "-n", n, "--template", "direct",
                 "--capture-dir", str(args.cache / "streams"), "--batch-size", str(args.batch_size),
                 "--device", "cpu"],
                logs / f"capture-{model}.log",
            )  # fmt: skip
        if not ok:
            failed.append(step)
    print(f"steps failed: {failed}" if failed else "all steps done", flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
