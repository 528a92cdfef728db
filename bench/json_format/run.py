"""A second capability (issue 24, part 3): answering as JSON, contrasted by a format instruction instead of
the cot prompt, built and transferred with the same pipeline, and checked by a parse, not by judgement.

The capability is `json.txt` minus `direct`: the same problem, asked for `{"answer": <number>}` instead of an
answer between markers. Stages (each resumable: what exists under --out is reused):
  build      `unlock extract` of the source and of the target with those two templates (MATH problems
             0-63, as issue 14's cot), then `unlock align` of the source's into the target with issue 14's
             alignment (bench/rank/sweep.py's; the captures are shared with it); the target's own direction
             (same-model); the random control (same per-layer norms) and the mean-axis control (the rank-1
             uncentred map)
  calibrate  `unlock calibrate` of the transfer and of the same-model direction through unlock-serve, as
             bench/calibrate/check.py runs it (no labels); the controls take the transfer's strength
  eval       GSM8K test items 700-899 (read by nothing else in the project), greedy, at most 192 tokens:
               direct             the `direct` prompt, unsteered
               prompt             json.txt, unsteered: the capability's own prompt
               unlock             `direct` + the transferred capability at its calibrated default
               same-model         `direct` + the target's own direction at its calibrated default
               control-random     `direct` + the random control at unlock's strength
               control-mean-axis  `direct` + the mean-axis control at unlock's strength
  report     per row, the share of outputs holding a JSON object with an "answer" key (scoring.json_answer),
             with exact McNemar tests on the same items, and the accuracy of those answers (report.md)

Usage: .venv/bin/python bench/json_format/run.py [STAGE ...] [--direction qwen15-to-qwen05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for folder in ("transfer", "calibrate", "rank"):
    sys.path.insert(0, str(REPO / "bench" / folder))
from check import calibration_record  # noqa: E402
from control_args import mean_axis_args  # noqa: E402
from run import BIN, Server, evaluate, random_control, read_jsonl, run_logged, same_model_capability  # noqa: E402
from run import extract as extract_directions  # noqa: E402
from scoring import gold_answer, json_answer, paired_change, wilson_interval  # noqa: E402
from sweep import CACHE, DIRECTIONS, alignment  # noqa: E402

from unlock import Capability  # noqa: E402
from unlock.templates import BUILTIN_TEMPLATES, load_template  # noqa: E402

TEMPLATE = HERE / "json.txt"
STAGES = ("build", "calibrate", "eval", "report")
EVAL_ITEMS = range(700, 900)
ROWS = ("direct", "prompt", "unlock", "same-model", "control-random", "control-mean-axis")
MAX_TOKENS = 192


def models(args: argparse.Namespace) -> tuple[Path, Path]:
    return tuple(CACHE / "models" / m for m in DIRECTIONS[args.direction])


def extract(args: argparse.Namespace, role: str, model: Path) -> Path:
    path = args.artifacts / f"extracted-{role}.safetensors"
    if not path.exists():
        log = args.artifacts / f"extract-{role}.log"
        extract_directions(model, CACHE / "data" / "math_test.jsonl", 64, path, log, unlocked=str(TEMPLATE))
    return path


def align(
    args: argparse.Namespace, name: str, extracted: Path, mean_axis_layers: list[int] | None = None
) -> Path:
    """The full-rank transfer, or with `mean_axis_layers` the mean-axis control at those layers."""
    path = args.artifacts / f"{name}.safetensors"
    if not path.exists():
        fit = mean_axis_args if mean_axis_layers else lambda rows, _: [*rows, "--rank", "full"]
        rows = [*alignment("issue14", args.out), "--capture-dir", str(CACHE / "streams" / args.direction)]
        run_logged(
            [str(BIN / "unlock"), "align", "--extracted", str(extracted), "--target", str(models(args)[1]),
             *fit(rows, mean_axis_layers), "--store", "directions",
             "--mode", "rotate", "--strength", "0.1", "--name", name, "-o", str(path)],
            args.artifacts / f"align-{name}.log",
        )  # fmt: skip
    return path


def build(args: argparse.Namespace) -> None:
    source, target = models(args)
    unlock = align(args, "json-xfer", extract(args, "source", source))
    same = args.artifacts / "json-same.safetensors"
    if not same.exists():
        same_model_capability(extract(args, "target", target), target).save(same)
    random = args.artifacts / "control-random.safetensors"
    if not random.exists():
        random_control(unlock, target, seed=0).save(random)
    align(
        args,
        "control-mean-axis",
        args.artifacts / "extracted-source.safetensors",
        Capability.load(unlock).layers,
    )


def calibrate(args: argparse.Namespace) -> None:
    folder = args.out / "calibrated"
    folder.mkdir(exist_ok=True)
    todo = [n for n in ("json-xfer", "json-same") if not (folder / f"{n}.json").exists()]
    if todo:
        serve = argparse.Namespace(
            target=models(args)[1], out=args.out, dtype="bfloat16", max_tokens=512, batch=32
        )
        with Server(serve) as server:
            for name in todo:
                artifact = args.artifacts / f"{name}.safetensors"
                record = calibration_record(server, artifact, folder / f"{name}.safetensors")
                (folder / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    strength = json.loads((folder / "json-xfer.json").read_text()).get("calibrated")
    if strength is None:
        raise SystemExit("the transfer's calibration refused a strength; the controls have none to take")
    for control in ("control-random", "control-mean-axis"):
        note = json.dumps({"row": control, "strength": strength, "from": "json-xfer's calibration"})
        cap = Capability.load(args.artifacts / f"{control}.safetensors")
        cap.with_default_strength(strength, note).save(folder / f"{control}.safetensors")


def evaluate_rows(args: argparse.Namespace) -> None:
    gsm = read_jsonl(CACHE / "data" / "gsm8k_test.jsonl")
    items = [(i, gsm[i]) for i in EVAL_ITEMS]
    direct, prompt = BUILTIN_TEMPLATES["direct"], load_template(str(TEMPLATE))
    capability = {"unlock": "json-xfer", "same-model": "json-same"}
    serve = argparse.Namespace(
        target=models(args)[1], out=args.out, dtype="bfloat16", max_tokens=MAX_TOKENS, batch=40
    )
    (args.out / "eval").mkdir(exist_ok=True)
    with Server(serve) as server:
        for row in ROWS:
            name = capability.get(row, row)
            steered = row not in ("direct", "prompt")
            if steered:
                server.upload(name, args.out / "calibrated" / f"{name}.safetensors")
            template = prompt if row == "prompt" else direct
            out = args.out / "eval" / f"{row}.jsonl"
            asyncio.run(evaluate(server, row, items, template, [name] if steered else None, out, serve))


def report(args: argparse.Namespace) -> str:
    gsm = read_jsonl(CACHE / "data" / "gsm8k_test.jsonl")
    formats, answers, opens = {}, {}, {}
    for row in ROWS:
        path = args.out / "eval" / f"{row}.jsonl"
        if not path.exists():
            continue
        records = {r["index"]: r for r in read_jsonl(path) if r["index"] in EVAL_ITEMS}
        checked = {i: json_answer(r["text"]) for i, r in records.items()}
        formats[row] = {i: ok for i, (ok, _) in checked.items()}
        opens[row] = sum(r["text"].lstrip().startswith("{") for r in records.values())
        answers[row] = {i: value == gold_answer(gsm[i]["answer"]) for i, (_, value) in checked.items()}
    strengths = {}
    for name in ("json-xfer", "json-same"):
        path = args.out / "calibrated" / f"{name}.json"
        strengths[name] = json.loads(path.read_text()).get("calibrated", "refused") if path.exists() else "-"
    note = {"unlock": strengths["json-xfer"], "same-model": strengths["json-same"]}
    note.update({c: strengths["json-xfer"] for c in ("control-random", "control-mean-axis")})
    lines = [
        f"# JSON answers, {args.direction}: GSM8K test items {EVAL_ITEMS.start}-{EVAL_ITEMS.stop - 1}",
        "",
        "| row | strength | JSON answer (95% CI) | vs direct (exact McNemar) | right answers in JSON "
        "| opens with { |",
        "|---|---|---|---|---|---|",
    ]
    for row, ok in formats.items():
        n, k = len(ok), sum(ok.values())
        lo, hi = wilson_interval(k, n)
        versus = paired_change(formats["direct"], ok) if row != "direct" and "direct" in formats else "-"
        right = sum(answers[row].values())
        lines.append(
            f"| {row} | {note.get(row, '-')} | {k}/{n}, {k / n:.1%} ({lo:.1%}-{hi:.1%}) | {versus} "
            f"| {right}/{n} | {opens[row]}/{n} |"
        )
    pairs = [("control-mean-axis", "unlock"), ("control-random", "unlock"), ("unlock", "same-model")]
    lines += ["", "Paired, on the JSON check:"]
    lines += [
        f"- {a} -> {b}: {paired_change(formats[a], formats[b])}" for a, b in pairs if {a, b} <= set(formats)
    ]
    lines += [
        "",
        f"Greedy, at most {MAX_TOKENS} new tokens, served in bfloat16; strengths from `unlock calibrate`.",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(text)
    return text


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("stages", nargs="*", metavar="STAGE", help=f"of {', '.join(STAGES)} (default: all)")
    parser.add_argument("--direction", choices=DIRECTIONS, default="qwen15-to-qwen05")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if set(args.stages) - set(STAGES):
        parser.error(f"unknown stages {sorted(set(args.stages) - set(STAGES))}")
    args.out = args.out / args.direction
    args.artifacts = args.out / "artifacts"
    args.artifacts.mkdir(parents=True, exist_ok=True)
    steps = {"build": build, "calibrate": calibrate, "eval": evaluate_rows, "report": report}
    for stage in args.stages or STAGES:
        result = steps[stage](args)
        if stage == "report":
            print(result)


if __name__ == "__main__":
    main()
