"""The transfer experiment's figures, from what `run.py` saved under --out (matplotlib, no display).

- `accuracy_vs_strength.png`: accuracy on the tuning split against strength, one line per capability, with
  the unsteered target on the same items as a dashed line;
- `alignment_error.png`: the held-out relative alignment error |X_t - X_s W| / |X_t| per target layer, one
  line per rank (from each cross-model artifact's metadata).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from unlock import Capability  # noqa: E402

TUNE_FILE = re.compile(r"(?P<name>.+)@(?P<strength>[0-9.]+)\.jsonl")


def _accuracy(path: Path) -> float:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(r["correct"] for r in rows) / max(len(rows), 1)


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


def _save(fig, ax, title: str, path: Path) -> Path:
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_all(out: Path) -> list[Path]:
    return [p for p in (accuracy_vs_strength(out), alignment_error(out)) if p is not None]
