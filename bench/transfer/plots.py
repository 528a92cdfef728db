"""The transfer experiment's figures, from what `run.py` saved under --out (matplotlib, no display).

- `accuracy_vs_strength.png`: accuracy on the tuning split against strength, one line per capability, with
  the unsteered target on the same items as a dashed line;
- `alignment_error.png`: the held-out relative alignment error |X_t - X_s W| / |X_t| per target layer, one
  line per rank (from each cross-model artifact's metadata);
- `evaluated_rows.png`: each evaluated row's accuracy with its 95% Wilson interval.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scoring import wilson_interval  # noqa: E402

from unlock import Capability  # noqa: E402

TUNE_FILE = re.compile(r"(?P<name>.+)@(?P<strength>[0-9.]+)\.jsonl")


def _correct(path: Path) -> tuple[int, int]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(r["correct"] for r in rows), len(rows)


def _accuracy(path: Path) -> float:
    correct, total = _correct(path)
    return correct / max(total, 1)


def accuracy_vs_strength(out: Path) -> Path | None:
    tune = out / "tune"
    curves: dict[str, list[tuple[float, float]]] = {}
    for path in sorted(tune.glob("*@*.jsonl")) if tune.exists() else []:
        match = TUNE_FILE.fullmatch(path.name)
        if match:
            curves.setdefault(match["name"], []).append((float(match["strength"]), _accuracy(path)))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in sorted(curves.items()):
        xs, ys = zip(*sorted(points), strict=True)
        label = "same-model direction" if name == "same" else f"UNLOCK, {name}"
        ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
    baseline = tune / "direct.jsonl"
    if baseline.exists():
        ax.axhline(100 * _accuracy(baseline), color="grey", linestyle="--", label="target, unsteered")
    ax.set_xlabel("strength (rotate)")
    ax.set_ylabel("GSM8K accuracy, tuning split (%)")
    return _save(fig, ax, f"Accuracy against strength ({out.name})", out / "accuracy_vs_strength.png")


def alignment_error(out: Path) -> Path | None:
    artifacts = sorted((out / "artifacts").glob("xfer-*.safetensors"))
    if not artifacts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for path in artifacts:
        capability = Capability.load(path)
        errors = capability.alignment_errors
        if errors:
            ax.plot(capability.layers, errors, marker=".", label=capability.name)
    ax.set_xlabel("target layer")
    ax.set_ylabel("held-out relative error")
    ax.set_ylim(bottom=0)
    return _save(fig, ax, f"Alignment error per layer ({out.name})", out / "alignment_error.png")


def evaluated_rows(out: Path, rows: Sequence[str]) -> Path | None:
    counts = [
        (row, *_correct(out / f"eval-{row}.jsonl")) for row in rows if (out / f"eval-{row}.jsonl").exists()
    ]
    if not counts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    tops = []
    for x, (row, correct, total) in enumerate(counts):
        share = correct / max(total, 1)
        low, high = wilson_interval(correct, total)
        tops.append(100 * high)
        ax.bar(x, 100 * share, color="tab:orange" if row == "unlock" else "tab:grey")
        ax.errorbar(
            x, 100 * share, yerr=[[100 * (share - low)], [100 * (high - share)]], color="black", capsize=4
        )
        ax.annotate(
            f"{correct}/{total}", (x, tops[-1]), textcoords="offset points", xytext=(0, 3), ha="center"
        )
    ax.set_xticks(range(len(counts)), [row for row, _, _ in counts], rotation=20)
    ax.set_ylim(0, max(tops) * 1.15)  # room for the labels
    ax.set_ylabel("GSM8K accuracy, evaluated items (%)")
    return _save(fig, ax, f"Evaluated rows, 95% Wilson intervals ({out.name})", out / "evaluated_rows.png")


def _save(fig, ax, title: str, path: Path) -> Path:
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_all(out: Path, rows: Sequence[str]) -> list[Path]:
    figures = (accuracy_vs_strength(out), alignment_error(out), evaluated_rows(out, rows))
    return [p for p in figures if p is not None]
