"""The report of bench/lmeval/run.py: the harness's own scores per row, with what shows the mechanism.

Per row, from the harness's saved samples (`--log_samples`): exact_match under the harness's filters (GSM8K:
strict-match, the number after the answer marker; flexible-extract, the harness's last-number rule; MATH:
exact_match and math_verify) with 95% Wilson intervals; the project's own GSM8K parser as a second column;
the fraction of outputs that reason step by step before answering, and the accuracy on those; paired
comparisons with exact McNemar p-values; and the issue's goals checked on the headline metric.

Usage: .venv/bin/python bench/lmeval/report.py qwen15-to-qwen05 [--task unlock_gsm8k_fresh]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "transfer"))
from scoring import gold_answer, mcnemar_exact, parse_answer, wilson_interval  # noqa: E402

ROWS = ("direct", "unlock", "control-random", "control-mean-axis", "unlock-label-best", "same-model", "cot")
HEADLINE = {"unlock_gsm8k_fresh": "flexible-extract", "unlock_math_fresh": "math_verify"}
PAIRS = [("direct", row) for row in ROWS[1:]] + [
    ("control-mean-axis", "unlock"),
    ("unlock", "unlock-label-best"),
    ("unlock", "same-model"),
    ("unlock", "cot"),
]


def reasons(text: str) -> bool:
    """Step-by-step before the answer: at least two non-empty lines, or 30 words, before the marker."""
    body = text.split("<atok>")[0]
    return len([line for line in body.splitlines() if line.strip()]) >= 2 or len(body.split()) >= 30


def load_row(folder: Path) -> dict[int, dict] | None:
    """doc_id -> {text, doc, scores by metric name} from the newest samples file under `folder`."""
    files = sorted(folder.rglob("samples_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    items: dict[int, dict] = {}
    for sample in map(json.loads, files[-1].open()):
        item = items.setdefault(sample["doc_id"], {"text": sample["resps"][0][0], "doc": sample["doc"]})
        scores = item.setdefault("scores", {})
        for metric in ("exact_match", "math_verify", "math_verify_answer"):
            if metric in sample:
                name = sample.get("filter", "none") if metric == "exact_match" else metric
                scores[name if name != "none" else metric] = bool(sample[metric])
    for item in items.values():
        if "question" in item["doc"]:  # GSM8K: the project's own parser, beside the harness's filters
            gold = gold_answer(item["doc"]["answer"])
            item["scores"]["project parser"] = parse_answer(item["text"]) == gold
    return items


def share(correct: int, total: int) -> str:
    low, high = wilson_interval(correct, total)
    return f"{correct}/{total} ({correct / total:.1%}, {low:.1%}-{high:.1%})"


def paired(a: dict[int, dict], b: dict[int, dict], metric: str) -> tuple[int, int, float]:
    common = sorted(set(a) & set(b))
    gained = sum(not a[i]["scores"][metric] and b[i]["scores"][metric] for i in common)
    lost = sum(a[i]["scores"][metric] and not b[i]["scores"][metric] for i in common)
    return gained, lost, mcnemar_exact(gained, lost)


def report(direction: str, task: str, root: Path) -> str:
    rows = {row: load_row(root / direction / task / row) for row in ROWS}
    rows = {row: items for row, items in rows.items() if items}
    if not rows:
        return f"no rows of {task} under {root / direction}\n"
    metrics = list(next(iter(rows.values()))[min(next(iter(rows.values())))]["scores"])
    headline = HEADLINE.get(task, metrics[0])
    lines = [f"# {direction}, {task} (lm-evaluation-harness, local-completions through unlock-serve)", ""]
    lines.append("| row | " + " | ".join(metrics) + " | step by step | accuracy when step by step |")
    lines.append("|---|" + "---|" * (len(metrics) + 2))
    for row, items in rows.items():
        n = len(items)
        cells = [share(sum(i["scores"][m] for i in items.values()), n) for m in metrics]
        stepwise = [i for i in items.values() if reasons(i["text"])]
        on_steps = share(sum(i["scores"][headline] for i in stepwise), len(stepwise)) if stepwise else "-"
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {len(stepwise) / n:.0%} | {on_steps} |")
    others = [m for m in metrics if m != headline]
    lines += ["", f"Paired on the same items (exact McNemar; {headline}, then {', '.join(others)}):", ""]
    other_heads = "".join(f" {m}: gained / lost, p |" for m in others)
    lines.append("| from | to | gained | lost | p |" + other_heads)
    lines.append("|---|---|---|---|---|" + "---|" * len(others))
    for a, b in PAIRS:
        if a in rows and b in rows:
            gained, lost, p = paired(rows[a], rows[b], headline)
            rest = [paired(rows[a], rows[b], m) for m in others]
            cells = "".join(f" {g} / {lo}, {q:.2g} |" for g, lo, q in rest)
            lines.append(f"| {a} | {b} | {gained} | {lost} | {p:.2g} |{cells}")
    lines += ["", *(math_goal(rows, metrics) if task.startswith("unlock_math") else goals(rows, headline))]
    return "\n".join(lines) + "\n"


def goals(rows: dict[str, dict], metric: str) -> list[str]:
    """Issue 23's 'Done when' on the headline metric, where the rows it needs are there."""

    def rate(row: str) -> float:
        return sum(i["scores"][metric] for i in rows[row].values()) / len(rows[row])

    out = ["Goals (issue 23):"]
    if {"direct", "unlock"} <= set(rows):
        gain = rate("unlock") - rate("direct")
        p = paired(rows["direct"], rows["unlock"], metric)[2]
        met = gain >= 0.15 and p < 0.01
        out.append(f"- unlock >= direct + 15 points, p < 0.01: {gain:+.1%}, p = {p:.2g}: {_ok(met)}")
        if "unlock-label-best" in rows:
            best = rate("unlock-label-best") - rate("direct")
            ratio = gain / best if best > 0 else float("nan")
            met = ratio >= 0.8
            out.append(f"- at least 80% of the label-best gain: {ratio:.0%} of {best:+.1%}: {_ok(met)}")
        if "control-random" in rows:
            delta = rate("control-random") - rate("direct")
            out.append(f"- random control within 2 points of direct: {delta:+.1%}: {_ok(abs(delta) <= 0.02)}")
        if "control-mean-axis" in rows:
            axis = rate("control-mean-axis") - rate("direct")
            out.append(f"- mean-axis gains at most half of unlock's: {axis:+.1%}: {_ok(axis <= gain / 2)}")
    if {"unlock", "same-model"} <= set(rows):
        own = rows["same-model"]
        low, high = wilson_interval(sum(i["scores"][metric] for i in own.values()), len(own))
        met = low <= rate("unlock") <= high
        out.append(
            f"- moonshot, unlock within same-model's 95% interval: {rate('unlock'):.1%} against "
            f"{rate('same-model'):.1%} ({low:.1%}-{high:.1%}): {_ok(met)}"
        )
    return out


def math_goal(rows: dict[str, dict], metrics: list[str]) -> list[str]:
    """Issue 23's MATH goal, unlock above direct with p < 0.05, under each metric."""
    if not {"direct", "unlock"} <= set(rows):
        return []
    out = ["Goal (issue 23, MATH): unlock above direct, p < 0.05:"]
    for metric in metrics:
        gained, lost, p = paired(rows["direct"], rows["unlock"], metric)
        met = gained > lost and p < 0.05
        out.append(f"- {metric}: {gained} gained, {lost} lost, p = {p:.2g}: {_ok(met)}")
    return out


def _ok(met: bool) -> str:
    return "met" if met else "NOT met"


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("direction")
    parser.add_argument("--task", default="unlock_gsm8k_fresh")
    parser.add_argument("--root", type=Path, default=HERE / "results")
    cli = parser.parse_args()
    text = report(cli.direction, cli.task, cli.root)
    (cli.root / cli.direction / f"report-{cli.task}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
