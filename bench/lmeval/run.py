"""Issue 23's evaluation rows, scored by lm-evaluation-harness through unlock-serve, on fresh items.

One direction of the transfer at a time: the target is served by unlock-serve (bfloat16), its capabilities
uploaded, and each row is `lm_eval run --model local-completions` with the row's model name, so a row is
selected the way a client that cannot send extra fields would select it:

  direct              target                      the `direct` prompt, unsteered
  unlock              target+unlock               the transferred capability at its calibrated default
  unlock-label-best   target+unlock-label-best    the same directions at the strength tuned on labels
                                                  (issue 14; for reference only)
  same-model          target+same                 the target's own cot - direct direction, calibrated
  cot                 target, cot template        the capability's unlocked prompt (task *_cot)
  control-random      target+control-random       a random direction of the same norms, unlock's strength
  control-mean-axis   target+control-mean-axis    the rank-1 uncentred map, unlock's strength

The artifacts come from bench/transfer/results/issue14/<direction>/artifacts; the calibrated defaults from
bench/calibrate/results/<case>.json (written by bench/calibrate/check.py). Requests are cached by the
harness (`--use_cache`), so a rerun resumes where a killed run stopped. Output per row under
results/<direction>/<task>/<row>/ (the harness's JSON and samples); `report.py` reads them.

Usage: .venv/bin/python bench/lmeval/run.py qwen15-to-qwen05 [--task unlock_gsm8k_fresh] [--rows ROW ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "bench" / "transfer"))
from run import BIN, Server  # noqa: E402

from unlock import Capability  # noqa: E402

SWEEPS = REPO / "bench" / "transfer" / "results" / "issue14"
CALIBRATION = REPO / "bench" / "calibrate" / "results"
DIRECTIONS = {  # direction: (target model, calibration case of the transfer, of the same-model direction)
    "qwen15-to-qwen05": ("qwen05", "qwen15-to-qwen05", "qwen05-same"),
    "qwen05-to-qwen15": ("qwen15", "qwen05-to-qwen15", "qwen15-same"),
}
ROWS = ("direct", "unlock", "control-random", "control-mean-axis", "unlock-label-best", "same-model", "cot")


def calibrated(case: str) -> float:
    record = json.loads((CALIBRATION / f"{case}.json").read_text())
    if "calibrated" not in record:
        raise SystemExit(f"{case}: calibration refused a strength ({record['stderr_tail']}); nothing to run")
    return record["calibrated"]


def capabilities(direction: str, out: Path) -> dict[str, Path]:
    """The row capabilities, each with the default strength its row runs at."""
    _, transfer_case, same_case = DIRECTIONS[direction]
    artifacts = SWEEPS / direction / "artifacts"
    strength = calibrated(transfer_case)
    label_best = json.loads((SWEEPS / direction / "choice.json").read_text())["unlock"]["strength"]
    plan = {
        "unlock": ("xfer-tok", strength),
        "unlock-label-best": ("xfer-tok", label_best),
        "same": ("same", calibrated(same_case)),
        "control-random": ("control-random", strength),
        "control-mean-axis": ("control-mean-axis", strength),
    }
    folder = out / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (artifact, default) in plan.items():
        source = Capability.load(artifacts / f"{artifact}.safetensors")
        note = json.dumps({"row": name, "strength": default, "from": f"{direction}/{artifact}"})
        paths[name] = folder / f"{name}.safetensors"
        source.with_default_strength(default, note).save(paths[name])
    return paths


# With --rescore every request is answered from the cache; a miss fails at once on this closed port.
NO_SERVER = argparse.Namespace(url="http://127.0.0.1:9")


def model_name(row: str) -> str:
    return {"direct": "target", "cot": "target", "same-model": "target+same"}.get(row, f"target+{row}")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("direction", choices=DIRECTIONS)
    parser.add_argument("--task", default="unlock_gsm8k_fresh", help="or unlock_math_fresh")
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--limit", type=int, help="first N items only (a smoke run)")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="score the rows again from the harness's request cache, with no server (after a scoring change)",
    )
    cli = parser.parse_args()
    out = cli.out / cli.direction
    out.mkdir(parents=True, exist_ok=True)
    paths = capabilities(cli.direction, out)
    target = REPO / "bench" / "cache" / "models" / DIRECTIONS[cli.direction][0]
    serve = argparse.Namespace(
        target=target, out=out, dtype="bfloat16", max_tokens=768, batch=cli.concurrency
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    with contextlib.nullcontext(NO_SERVER) if cli.rescore else Server(serve) as server:
        for name, path in paths.items() if not cli.rescore else ():
            server.upload(name, path)
        for row in cli.rows:
            task = cli.task + ("_cot" if row == "cot" else "")
            model_args = (
                f"model={model_name(row)},base_url={server.url}/v1/completions,"
                f"num_concurrent={cli.concurrency},max_retries=3,tokenized_requests=False,"
                "tokenizer_backend=None,timeout=3600"
            )
            cmd = [str(BIN / "lm_eval"), "run", "--model", "local-completions", "--model_args", model_args,
                   "--tasks", task, "--include_path", str(HERE / "tasks"), "--log_samples",
                   "--output_path", str(out / cli.task / row),
                   "--use_cache", str(out / "cache" / f"{cli.task}-{row}")]  # fmt: skip
            if cli.limit:
                cmd += ["--limit", str(cli.limit)]
            print("$", " ".join(cmd), flush=True)
            with (out / f"lm_eval-{cli.task}-{row}.log").open("a") as log:
                run = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            code = run.returncode
            print(f"{row}: exit {code}", flush=True)


if __name__ == "__main__":
    main()
