"""Check `unlock calibrate` against the labelled sweeps of issue 14 (issue 23, "What to deliver" 2).

For each capability of the sweeps, serve its target with unlock-serve, run `unlock calibrate` on the
capability's own extraction prompts (MATH test problems 0-31, their `problem` field: unlabelled, and
disjoint from the GSM8K items the sweeps scored), over the sweep's strength grid, and put the strength it
picks beside the label-best strength and the GSM8K tuning accuracy (items 1000-1079) of both, read from the
saved sweep files. The calibration never sees those files; this script reads them afterwards.

Each case writes `results/<case>.json` (and the calibrated artifact `results/<case>.safetensors`) and is
skipped on a rerun; `results/check.md` is the table over the cases done.

Usage: .venv/bin/python bench/calibrate/check.py [CASE ...]   (default: every case)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "bench" / "transfer"))
from run import ADMIN_KEY, BIN, Server  # noqa: E402

SWEEPS = REPO / "bench" / "transfer" / "results" / "issue14"
MATH = REPO / "bench" / "cache" / "data" / "math_test.jsonl"
MODELS = REPO / "bench" / "cache" / "models"
# case: (target model, sweep folder, artifact, the sweep's file prefix for this capability)
CASES = {
    "qwen15-to-qwen05": ("qwen05", "qwen15-to-qwen05", "xfer-tok", "xfer-tok"),
    "qwen05-same": ("qwen05", "qwen15-to-qwen05", "same", "same"),
    "qwen05-to-qwen15": ("qwen15", "qwen05-to-qwen15", "xfer-tok", "xfer-tok"),
    "qwen15-same": ("qwen15", "qwen05-to-qwen15", "same", "same"),
}
STRENGTHS = "0.02,0.03,0.04,0.05,0.07,0.1,0.2"  # the grid the sweeps were run on


def calibrate_served(server: Server, artifact: Path, out: Path) -> subprocess.CompletedProcess:
    """`unlock calibrate` of `artifact` through `server`, on MATH problems 0-31 (no labels), over STRENGTHS;
    the calibrated capability goes to `out` (its table on stdout, a refusal's reason on stderr)."""
    return subprocess.run(
        [str(BIN / "unlock"), "calibrate", str(artifact), "--url", server.url, "--admin-key", ADMIN_KEY,
         "--data", str(MATH), "--field", "problem", "-n", "32", "--strengths", STRENGTHS, "-o", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip


def calibration_record(server: Server, artifact: Path, out: Path) -> dict:
    """`calibrate_served`, summed up for a results file: exit status, table, the end of stderr, and the
    chosen strength when one qualified."""
    proc = calibrate_served(server, artifact, out)
    record = {"exit": proc.returncode, "table": proc.stdout.strip(), "stderr": proc.stderr[-400:]}
    if proc.returncode == 0:
        from unlock import Capability

        record["calibrated"] = Capability.load(out).default_strength
    print(f"{artifact.stem}: {record.get('calibrated', 'refused')}\n{record['table']}", flush=True)
    return record


def sweep_accuracy(tune: Path, prefix: str) -> dict[float, float]:
    """GSM8K tuning accuracy per strength, from the saved sweep files (labels: read here only)."""
    scores = {}
    for path in tune.glob(f"{prefix}@*.jsonl"):
        rows = [json.loads(line) for line in path.open()]
        scores[float(path.stem.split("@")[1])] = sum(r["correct"] for r in rows) / len(rows)
    return scores


def run_case(case: str, out: Path) -> dict:
    model, sweep, artifact, prefix = CASES[case]
    folder = out / case
    folder.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(target=MODELS / model, out=folder, dtype="bfloat16", max_tokens=512, batch=32)
    calibrated = out / f"{case}.safetensors"
    started = time.time()
    with Server(args) as server:
        proc = calibrate_served(server, SWEEPS / sweep / "artifacts" / f"{artifact}.safetensors", calibrated)
    accuracy = sweep_accuracy(SWEEPS / sweep / "tune", prefix)
    label_best = max(accuracy, key=lambda s: (accuracy[s], -s))
    record = {
        "case": case,
        "target": model,
        "artifact": f"{sweep}/artifacts/{artifact}.safetensors",
        "exit": proc.returncode,
        "table": proc.stdout.strip(),
        "stderr_tail": proc.stderr.strip().splitlines()[-1:] if proc.returncode else [],
        "seconds": round(time.time() - started),
        "label_best": label_best,
        "tune_accuracy": accuracy,
    }
    if proc.returncode == 0:
        from unlock import Capability

        record["calibrated"] = Capability.load(calibrated).default_strength
    (out / f"{case}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def direct_accuracy(sweep: str) -> float:
    rows = [json.loads(line) for line in (SWEEPS / sweep / "tune" / "direct.jsonl").open()]
    return sum(r["correct"] for r in rows) / len(rows)


def write_table(out: Path) -> str:
    lines = [
        "| case | target | calibrated (no labels) | its tuning accuracy | label-best | its tuning accuracy "
        "| direct | share of the label-best gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        path = out / f"{case}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        acc = {float(k): v for k, v in r["tune_accuracy"].items()}
        direct = direct_accuracy(CASES[case][1])
        best = acc[r["label_best"]]
        got = r.get("calibrated")
        got_acc = acc.get(got) if got is not None else None
        share = (got_acc - direct) / (best - direct) if got_acc is not None and best > direct else None
        lines.append(
            f"| {case} | {r['target']} | {got if got is not None else 'refused'} | "
            f"{'-' if got_acc is None else f'{got_acc:.1%}'} | {r['label_best']} | {best:.1%} | "
            f"{direct:.1%} | "
            f"{'-' if share is None else f'{share:.0%}'} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "check.md").write_text(text)
    return text


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("cases", nargs="*", help=f"of {', '.join(CASES)} (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    cli = parser.parse_args()
    unknown = set(cli.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}")
    for case in cli.cases or CASES:
        if (cli.out / f"{case}.json").exists():
            continue
        record = run_case(case, cli.out)
        print(f"{case}: calibrated {record.get('calibrated', 'refused')}, label-best {record['label_best']} "
              f"({record['seconds']} s)\n{record['table']}", flush=True)  # fmt: skip
    print(write_table(cli.out))


if __name__ == "__main__":
    main()
