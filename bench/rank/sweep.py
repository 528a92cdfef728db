"""Is the map low-rank? Issue 24, part 1: the transfer of issue 14 refit at several ranks, each judged by its
agreement with the target's own direction, its held-out alignment error, its size, and its GSM8K accuracy at
the strength `unlock calibrate` gives it (no labels).

Stages (each resumable: what exists under --out is reused):
  build      `unlock extract` of the source (issue 14's prompts and templates), then one `unlock align`
             per rank with issue 14's alignment (all token pairs of 128 alignment texts, centred, ridge
             chosen from 0.1,0.3,1 by 5-fold error over texts), stored as factors; the ranks share the
             captures
  agree      per layer: the cosine of each rank's direction with the target's own (issue 14's `same`
             artifact) and the held-out error its artifact records; file bytes, and the table bytes a
             server keeps (the dense [layers, hidden] directions, at every rank)
  calibrate  `unlock calibrate` of each rank (its directions stored dense: what a server holds from it
             whatever the rank) through unlock-serve on the target, as bench/calibrate/check.py
             runs it (MATH problems 0-31, their `problem` field; issue 23's grid); a refusal is reported
  tune       GSM8K items 1000-1079 (issue 14's tuning split), greedy, the `direct` prompt, each calibrated
             capability at its default strength, and unsteered
  report     the rank table (results/<direction>/report.md, rank.json) and a figure of agreement per layer

Usage: .venv/bin/python bench/rank/sweep.py [STAGE ...] [--direction qwen15-to-qwen05] [--ranks 8 32 128 full]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "bench" / "transfer"))
sys.path.insert(0, str(REPO / "bench" / "calibrate"))
from check import calibration_record  # noqa: E402
from run import BIN, Server, accuracy, evaluate, extract, read_jsonl, run_logged  # noqa: E402
from scoring import paired_change, wilson_interval  # noqa: E402

from unlock import Capability, TargetInfo  # noqa: E402
from unlock.artifacts import REQUIRED_KEYS  # noqa: E402
from unlock.templates import BUILTIN_TEMPLATES, render  # noqa: E402

CACHE = REPO / "bench" / "cache"
ISSUE14 = REPO / "bench" / "transfer" / "results" / "issue14"
DIRECTIONS = {"qwen15-to-qwen05": ("qwen15", "qwen05"), "qwen05-to-qwen15": ("qwen05", "qwen15")}
STAGES = ("build", "agree", "calibrate", "tune", "report")
TUNE_ITEMS = range(1000, 1080)
ALIGN = ["--align-positions", "all", "--align-n", "128", "--center", "--ridge", "0.1,0.3,1"]


def label(rank: str) -> str:
    return f"r{rank}"


def alignment(variant: str, out: Path) -> list[str]:
    """The `unlock align` rows of a variant: issue 14's (its 128 alignment texts in the `direct` template),
    or with `both-templates` the same texts also in the `cot` one, so that the fit sees the very contrast the
    capability is made of (no labels: the capability's own two templates, on unlabelled text)."""
    if variant == "issue14":
        return [*ALIGN, "--align-data", str(CACHE / "data" / "align_math.jsonl")]
    texts = out / "align-both-templates.jsonl"
    if not texts.exists():
        questions = [r["question"] for r in read_jsonl(CACHE / "data" / "align_math.jsonl")[:128]]
        rendered = [render(BUILTIN_TEMPLATES[t], q) for q in questions for t in ("direct", "cot")]
        texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in rendered))
    rows = [*ALIGN, "--align-data", str(texts), "--align-field", "text", "--align-template", "plain"]
    return [a if a != "128" else "256" for a in rows]  # --align-n: both renderings of the 128


def build(args: argparse.Namespace) -> None:
    source, target = (CACHE / "models" / m for m in DIRECTIONS[args.direction])
    extracted = args.artifacts / "extracted-source.safetensors"
    if not extracted.exists():
        log = args.artifacts / "extract-source.log"
        extract(source, CACHE / "data" / "math_test.jsonl", 64, extracted, log)
    for rank in args.ranks:
        path = args.artifacts / f"{label(rank)}.safetensors"
        if path.exists():
            continue
        run_logged(
            [str(BIN / "unlock"), "align", "--extracted", str(extracted), "--target", str(target),
             *alignment(args.variant, args.out), "--capture-dir", str(args.captures), "--rank", rank,
             "--store", "factors", "--mode", "rotate", "--strength", "0.1", "--name", label(rank),
             "-o", str(path)],
            args.artifacts / f"align-{label(rank)}.log",
        )  # fmt: skip


def halves(values: list[float]) -> tuple[float, float]:
    mid = len(values) // 2
    return sum(values[:mid]) / mid, sum(values[mid:]) / (len(values) - mid)


def agree(args: argparse.Namespace) -> dict:
    own = Capability.load(ISSUE14 / args.direction / "artifacts" / "same.safetensors").target_directions()
    rows = {}
    for rank in args.ranks:
        path = args.artifacts / f"{label(rank)}.safetensors"
        cap = Capability.load(path)
        mapped = cap.target_directions()  # [L, d_t]
        reference = own[cap.layers]
        cosines = torch.nn.functional.cosine_similarity(mapped.double(), reference.double(), dim=-1).tolist()
        errors = cap.alignment_errors
        early, late = halves(cosines)
        rows[rank] = {
            "k": int(cap.metadata["rank"]),
            "ridge": float(cap.metadata["ridge"]),
            "cosine": [round(c, 4) for c in cosines],
            "heldout_error": errors,
            "agreement_early": round(early, 4),
            "agreement_late": round(late, 4),
            "heldout_error_mean": round(sum(errors) / len(errors), 4),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),  # the file is not committed: too large
            "file_bytes": path.stat().st_size,
            "tensor_bytes": sum(t.numel() * t.element_size() for t in cap.tensors.values()),
            "table_bytes": mapped.numel() * 4,  # what a worker keeps: dense float32 rows, any rank
        }
    (args.out / "agreement.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def served_copy(args: argparse.Namespace, rank: str) -> Path:
    """The rank's capability with its directions stored dense: what a worker holds from it at any rank, and
    small enough to upload (the full-rank factor file is 286 MB, over the server's 64 MiB upload limit)."""
    path = args.artifacts / f"{label(rank)}-dense.safetensors"
    if not path.exists():
        cap = Capability.load(args.artifacts / f"{label(rank)}.safetensors")
        meta = {k: v for k, v in cap.metadata.items() if k not in REQUIRED_KEYS}  # from_directions sets those
        target = TargetInfo(
            cap.target_architecture, cap.target_num_layers, cap.target_hidden_size, cap.target_name
        )
        dense = Capability.from_directions(
            cap.name, cap.target_directions(), cap.layers, cap.mode, cap.default_strength, target, meta
        )
        dense.save(path)
    return path


def calibrate(args: argparse.Namespace) -> None:
    target = CACHE / "models" / DIRECTIONS[args.direction][1]
    todo = [r for r in args.ranks if not (args.out / "calibrated" / f"{label(r)}.json").exists()]
    if not todo:
        return
    (args.out / "calibrated").mkdir(exist_ok=True)
    serve = argparse.Namespace(target=target, out=args.out, dtype="bfloat16", max_tokens=512, batch=32)
    with Server(serve) as server:
        for rank in todo:
            out = args.out / "calibrated" / f"{label(rank)}.safetensors"
            record = calibration_record(server, served_copy(args, rank), out)
            (args.out / "calibrated" / f"{label(rank)}.json").write_text(json.dumps(record, indent=2) + "\n")


def calibrated(args: argparse.Namespace, rank: str) -> float | None:
    return json.loads((args.out / "calibrated" / f"{label(rank)}.json").read_text()).get("calibrated")


def tune(args: argparse.Namespace) -> None:
    target = CACHE / "models" / DIRECTIONS[args.direction][1]
    gsm = read_jsonl(CACHE / "data" / "gsm8k_test.jsonl")
    items = [(i, gsm[i]) for i in TUNE_ITEMS]
    serve = argparse.Namespace(target=target, out=args.out, dtype="bfloat16", max_tokens=512, batch=40)
    direct = BUILTIN_TEMPLATES["direct"]
    (args.out / "tune").mkdir(exist_ok=True)
    with Server(serve) as server:
        unsteered = args.out / "tune" / "direct.jsonl"
        asyncio.run(evaluate(server, "direct", items, direct, None, unsteered, serve))
        for rank in args.ranks:
            if calibrated(args, rank) is None:
                continue
            name = label(rank)
            server.upload(name, args.out / "calibrated" / f"{name}.safetensors")
            out = args.out / "tune" / f"{name}.jsonl"
            asyncio.run(evaluate(server, name, items, direct, [name], out, serve))


def report(args: argparse.Namespace) -> str:
    agreement = json.loads((args.out / "agreement.json").read_text())
    indices = set(TUNE_ITEMS)
    direct_path = args.out / "tune" / "direct.jsonl"
    by_item = lambda path: {r["index"]: r["correct"] for r in read_jsonl(path) if r["index"] in indices}  # noqa: E731
    direct = by_item(direct_path) if direct_path.exists() else {}
    lines = [
        "| rank (k) | ridge | agreement, early half | agreement, late half | held-out error "
        "| calibrated strength | GSM8K tuning accuracy (95% CI) | vs direct | artifact bytes | table bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for rank in args.ranks:
        a = agreement[rank]
        record = args.out / "calibrated" / f"{label(rank)}.json"
        strength = "-" if not record.exists() else calibrated(args, rank) or "refused"
        path = args.out / "tune" / f"{label(rank)}.jsonl"
        acc, versus = "-", "-"
        if path.exists():
            correct, n = accuracy(path, indices)
            lo, hi = wilson_interval(correct, n)
            acc = f"{correct}/{n}, {correct / n:.1%} ({lo:.1%}-{hi:.1%})"
            versus = paired_change(direct, by_item(path)) if direct else "-"
            summary[rank] = correct / n
        lines.append(
            f"| {rank} ({a['k']}) | {a['ridge']:g} | {a['agreement_early']:.2f} | "
            f"{a['agreement_late']:.2f} | {a['heldout_error_mean']:.3f} | {strength} | {acc} | "
            f"{versus} | {a['file_bytes']:,} | {a['table_bytes']:,} |"
        )
    if direct:
        lines += ["", f"Unsteered on the same items: {sum(direct.values())}/{len(direct)}."]
    if "full" in summary:
        within = [r for r in args.ranks if r in summary and summary[r] >= summary["full"] - 0.02]
        lines += [f"Smallest rank within 2 points of full on these items: {within[0] if within else 'none'}."]
    text = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(text)
    figures = {"accuracy": summary, "agreement": agreement}
    (args.out / "rank.json").write_text(json.dumps(figures, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    for rank in args.ranks:
        ax.plot(agreement[rank]["cosine"], label=f"rank {rank}")
    ax.set_xlabel("target layer")
    ax.set_ylabel("cosine with the target's own direction")
    ax.set_title(f"{args.direction}: agreement per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "agreement.png", dpi=120)
    return text


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("stages", nargs="*", metavar="STAGE", help=f"of {', '.join(STAGES)} (default: all)")
    parser.add_argument("--direction", choices=DIRECTIONS, default="qwen15-to-qwen05")
    parser.add_argument("--ranks", nargs="+", default=["8", "32", "128", "full"])
    parser.add_argument(
        "--variant",
        choices=["issue14", "both-templates"],
        default="issue14",
        help="the alignment rows (see `alignment`); results/<direction>[-<variant>]",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if set(args.stages) - set(STAGES):
        parser.error(f"unknown stages {sorted(set(args.stages) - set(STAGES))}")
    suffix = "" if args.variant == "issue14" else f"-{args.variant}"
    args.out = args.out / f"{args.direction}{suffix}"
    args.captures = CACHE / "streams" / f"{args.direction}{suffix}"
    args.artifacts = args.out / "artifacts"
    args.artifacts.mkdir(parents=True, exist_ok=True)
    steps = {"build": build, "agree": agree, "calibrate": calibrate, "tune": tune, "report": report}
    for stage in args.stages or STAGES:
        result = steps[stage](args)
        if stage == "report":
            print(result)


if __name__ == "__main__":
    main()
