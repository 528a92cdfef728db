"""The chain-of-thought transfer on GSM8K, measured through the served path (HTTP, batched), with controls.

Stages (each resumable: results are appended per item to JSONL files under --out and skipped when present):
  build   the candidate cross-model capabilities (`unlock align` with each --candidate's settings) and the
          same-model reference (the target's own cot - direct direction, no alignment)
  tune    candidate x strength, and the same-model strength, on a GSM8K split that is never evaluated; the
          best tuning accuracy picks the `unlock` row's capability and strength (choice.json)
  eval    the evaluated items, one file per row (eval-<row>.jsonl: index, gold, pred, text, ...):
            direct             the target with the `direct` template, unsteered
            unlock             + the chosen cross-model capability at the chosen strength
            control-random     + a random direction with the chosen capability's per-layer norms, layers and
                               strength (seeded)
            control-mean-axis  + the rank-1 uncentred map of the chosen candidate's rows (the target's mean
                               stream axis, signed by the map) at the same layers and strength
            cot                the target with the `cot` template, unsteered
            same-model         + the target's own direction at its tuned strength
  report  accuracy with 95% Wilson intervals, exact McNemar tests of every row against `direct`, figures

Example (issue 14's run, 1.5B -> 0.5B; models and captures from bench/fetch_assets.py and capture.py):
  C=bench/cache; A="--align-positions all --align-data $C/data/align_math.jsonl --capture-dir $C/streams"
  .venv/bin/python bench/transfer/run.py all --source $C/models/qwen15 --target $C/models/qwen05 \\
      --source-extracted $C/extracted/qwen15-math64.safetensors \\
      --target-extracted $C/extracted/qwen05-math64.safetensors \\
      --candidate tok "$A --align-n 256 --center --rank 896 --ridge 0.01,0.1" \\
      --out bench/transfer/results/issue14/qwen15-to-qwen05
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).parent))
from control_args import mean_axis_args  # noqa: E402
from plots import draw_all  # noqa: E402
from scoring import gold_answer, paired_change, parse_answer, wilson_interval  # noqa: E402
from serving_settings import SettingsMismatch, resolve_settings  # noqa: E402

from unlock import Capability, TargetInfo  # noqa: E402
from unlock.extracted import Extracted  # noqa: E402
from unlock.templates import ANSWER_CLOSE, BUILTIN_TEMPLATES, render  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
ADMIN_KEY = "bench-admin"
ROWS = ("direct", "unlock", "control-random", "control-mean-axis", "cot", "same-model")


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def run_logged(cmd: list[str], log: Path) -> None:
    print("$", shlex.join(cmd), flush=True)
    with log.open("w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def extracted_file(args: argparse.Namespace, role: str) -> Path:
    """`unlock extract` of the source or the target (the same prompts and templates): copied from
    --{role}-extracted when given, else extracted here."""
    path = args.out / "artifacts" / f"extracted-{role}.safetensors"
    given = getattr(args, f"{role}_extracted")
    if path.exists():
        return path
    if given is not None:
        shutil.copyfile(given, path)
        return path
    model = args.source if role == "source" else args.target
    extract(model, args.extract_data, args.n, path, args.out / "artifacts" / f"extract-{role}.log")
    return path


def extract(model: Path, data: Path, n: int, out: Path, log: Path, unlocked: str = "cot") -> None:
    """`unlock extract` as the transfer experiments run it: the `problem` field of the first `n` records,
    `direct` against `unlocked`, mean aggregation."""
    run_logged(
        [str(BIN / "unlock"), "extract", "--source-locked", str(model), "--data", str(data),
         "--field", "problem", "-n", str(n), "--locked-template", "direct", "--unlocked-template", unlocked,
         "--aggregation", "mean", "--batch-size", "8", "--record-paths", "-o", str(out)],
        log,
    )  # fmt: skip


def align(args: argparse.Namespace, name: str, align_args: list[str]) -> Path:
    """`unlock align` of the source's extraction into the target, dense directions (uploads stay small)."""
    path = args.out / "artifacts" / f"{name}.safetensors"
    if not path.exists():
        run_logged(
            [str(BIN / "unlock"), "align", "--extracted", str(extracted_file(args, "source")),
             "--target", str(args.target), *align_args, "--store", "directions", "--mode", "rotate",
             "--strength", "0.1", "--name", name, "-o", str(path)],
            args.out / "artifacts" / f"align-{name}.log",
        )  # fmt: skip
    return path


def build_candidates(args: argparse.Namespace) -> dict[str, Path]:
    (args.out / "artifacts").mkdir(parents=True, exist_ok=True)
    paths = {f"xfer-{name}": align(args, f"xfer-{name}", shlex.split(a)) for name, a in args.candidate}
    paths["same"] = args.out / "artifacts" / "same.safetensors"
    if not paths["same"].exists():
        same_model_capability(extracted_file(args, "target"), args.target).save(paths["same"])
    return paths


def target_info(target: Path, num_layers: int, hidden: int) -> TargetInfo:
    from transformers import AutoConfig

    return TargetInfo(AutoConfig.from_pretrained(target).architectures[0], num_layers, hidden, str(target))


def same_model_capability(extracted_path: Path, target: Path) -> Capability:
    """The target's own cot-minus-direct direction at every layer, as a capability (no alignment)."""
    extracted = Extracted.load(extracted_path)
    num_layers, hidden = extracted.directions.shape
    return Capability.from_directions(
        "same",
        extracted.directions,
        layers=list(range(num_layers)),
        mode="rotate",
        default_strength=0.1,
        target=target_info(target, num_layers, hidden),
        metadata={"source_locked": str(target), "n": extracted.metadata["n"]},
    )


def random_control(chosen: Path, target: Path, seed: int) -> Capability:
    """A seeded random direction per steered layer, with the chosen capability's per-layer norms."""
    capability = Capability.load(chosen)
    directions = capability.target_directions()  # [L, d]
    noise = torch.randn(directions.shape, generator=torch.Generator().manual_seed(seed))
    noise = noise / noise.norm(dim=-1, keepdim=True) * directions.norm(dim=-1, keepdim=True)
    return Capability.from_directions(
        "control-random",
        noise,
        layers=capability.layers,
        mode=capability.mode,
        default_strength=capability.default_strength,
        target=target_info(target, capability.target_num_layers, capability.target_hidden_size),
    )  # no metadata key says "control": its provenance is this function, --seed and choice.json


def build_controls(args: argparse.Namespace, choice: dict) -> dict[str, Path]:
    name = choice["unlock"]["name"]
    chosen = args.out / "artifacts" / f"{name}.safetensors"
    paths = {"control-random": args.out / "artifacts" / "control-random.safetensors"}
    if not paths["control-random"].exists():
        random_control(chosen, args.target, args.seed).save(paths["control-random"])
    candidate_args = shlex.split(dict(args.candidate)[name.removeprefix("xfer-")])
    layers = Capability.load(chosen).layers
    paths["control-mean-axis"] = align(args, "control-mean-axis", mean_axis_args(candidate_args, layers))
    meta = Capability.load(paths["control-mean-axis"]).metadata
    if (meta.get("center"), meta.get("rank")) != ("false", "1"):
        raise RuntimeError(f"control-mean-axis is not the rank-1 uncentred map: {meta}")
    return paths


class Server:
    """unlock-serve on the target model, as a child process on a free loopback port."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        a = self.args
        cmd = [
            str(BIN / "unlock-serve"), "--model", str(a.target), "--served-model-name", "target",
            "--port", str(self.port), "--host", "127.0.0.1", "--admin-key", ADMIN_KEY,
            "--capabilities-dir", str(a.out / "registry"), "--dtype", a.dtype,
            "--max-model-len", str(a.max_tokens + 1024), "--kv-cache-memory-bytes", str(4 << 30),
            "--max-num-seqs", str(a.batch),
        ]  # fmt: skip
        self.log = (a.out / "server.log").open("a")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 900
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"unlock-serve exited with {self.proc.returncode}; see {a.out / 'server.log'}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise RuntimeError("unlock-serve did not become healthy in 15 minutes")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def upload(self, name: str, path: Path) -> None:
        r = httpx.post(
            f"{self.url}/v1/capabilities",
            params={"name": name, "replace": "true"},
            content=path.read_bytes(),
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=600,
        )
        if r.status_code not in (200, 201):
            raise RuntimeError(f"upload of {name} failed: {r.status_code} {r.text}")


async def evaluate(
    server: Server,
    row: str,
    items: list[tuple[int, dict]],
    template: str,
    capabilities: dict[str, float] | list[str] | None,
    out_file: Path,
    args: argparse.Namespace,
) -> None:
    """Greedy completions for the items not yet in `out_file`, `args.batch` at a time; `capabilities` as a
    request's `capabilities` field ({name: strength}, or [name, ...] at their default strengths)."""
    done = {r["index"] for r in read_jsonl(out_file)} if out_file.exists() else set()
    todo = [(i, item) for i, item in items if i not in done]
    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    sem = asyncio.Semaphore(args.batch)
    extra = {"capabilities": capabilities} if capabilities else None

    async def one(index: int, item: dict) -> None:
        async with sem:
            resp = await client.completions.create(
                model="target",
                prompt=render(template, item["question"]),
                max_tokens=args.max_tokens,
                temperature=0.0,
                stop=[ANSWER_CLOSE],
                extra_body=extra,
            )
        text = resp.choices[0].text
        gold = gold_answer(item["answer"])
        append_jsonl(
            out_file,
            {
                "row": row,
                "index": index,
                "gold": gold,
                "pred": parse_answer(text),
                "correct": parse_answer(text) == gold,
                "tokens": resp.usage.completion_tokens,
                "finish": resp.choices[0].finish_reason,
                "text": text,
            },
        )

    started = time.time()
    async with client:  # closed inside this event loop (asyncio.run closes the loop afterwards)
        await asyncio.gather(*(one(i, item) for i, item in todo))
    if todo:
        print(f"{row}: {len(todo)} items in {time.time() - started:.0f}s", flush=True)


def accuracy(path: Path, indices: set[int]) -> tuple[int, int]:
    rows = [r for r in read_jsonl(path) if r["index"] in indices] if path.exists() else []
    return sum(r["correct"] for r in rows), len(rows)


def best(scores: dict[str, float]) -> str:
    """The key of the highest score; ties go to the first listed (the weaker strength, as listed)."""
    return max(scores, key=lambda k: scores[k])


def stage_tune(server: Server, args: argparse.Namespace, gsm: list[dict]) -> dict:
    """Pick the `unlock` row's candidate and strength, and the same-model strength, on the tuning split."""
    items = [(i, gsm[i]) for i in args.tune_items]
    direct = BUILTIN_TEMPLATES["direct"]
    tune_dir = args.out / "tune"
    tune_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(evaluate(server, "direct", items, direct, None, tune_dir / "direct.jsonl", args))
    runs = [(f"xfer-{name}", s) for name, _ in args.candidate for s in args.strengths]
    if "same-model" in args.rows:
        runs += [("same", s) for s in args.same_strengths]
    scores: dict[str, float] = {}
    for name, strength in runs:
        out = tune_dir / f"{name}@{strength}.jsonl"
        asyncio.run(evaluate(server, f"{name}@{strength}", items, direct, {name: strength}, out, args))
        correct, total = accuracy(out, set(args.tune_items))
        scores[f"{name}@{strength}"] = correct / max(total, 1)
    xfer = best({k: v for k, v in scores.items() if not k.startswith("same@")})
    choice = {
        "unlock": {"name": xfer.split("@")[0], "strength": float(xfer.split("@")[1])},
        "tune_scores": scores,
        "tune_items": len(items),
        "tune_direct": accuracy(tune_dir / "direct.jsonl", set(args.tune_items))[0] / len(items),
    }
    if "same-model" in args.rows:
        same = best({k: v for k, v in scores.items() if k.startswith("same@")})
        choice["same"] = {"name": "same", "strength": float(same.split("@")[1])}
    (args.out / "choice.json").write_text(json.dumps(choice, indent=2))
    return choice


def stage_eval(server: Server, args: argparse.Namespace, gsm: list[dict], choice: dict) -> None:
    items = [(i, gsm[i]) for i in args.eval_items]
    direct, cot = BUILTIN_TEMPLATES["direct"], BUILTIN_TEMPLATES["cot"]
    strength = choice["unlock"]["strength"]
    rows = {
        "direct": (direct, None),
        "unlock": (direct, {choice["unlock"]["name"]: strength}),
        "control-random": (direct, {"control-random": strength}),
        "control-mean-axis": (direct, {"control-mean-axis": strength}),
        "cot": (cot, None),
        "same-model": (direct, {"same": choice.get("same", {}).get("strength")}),
    }
    for row in args.rows:
        template, caps = rows[row]
        asyncio.run(evaluate(server, row, items, template, caps, args.out / f"eval-{row}.jsonl", args))


def stage_report(args: argparse.Namespace) -> str:
    indices = set(args.eval_items)
    results = {}
    for row in ROWS:
        path = args.out / f"eval-{row}.jsonl"
        if path.exists():
            results[row] = {r["index"]: r for r in read_jsonl(path) if r["index"] in indices}
    correct_by_row = {row: {i: r["correct"] for i, r in res.items()} for row, res in results.items()}
    lines = [
        "| row | correct | n | accuracy | 95% CI | mean tokens | hit token cap | vs direct (exact McNemar) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, res in results.items():
        n = len(res)
        correct = sum(r["correct"] for r in res.values())
        lo, hi = wilson_interval(correct, n)
        toks = sum(r["tokens"] for r in res.values()) / max(n, 1)
        capped = sum(r["finish"] == "length" for r in res.values())
        versus = ""
        if row != "direct" and "direct" in correct_by_row:
            versus = paired_change(correct_by_row["direct"], correct_by_row[row])
        lines.append(
            f"| {row} | {correct} | {n} | {correct / max(n, 1):.1%} | [{lo:.1%}, {hi:.1%}] | {toks:.0f} | "
            f"{capped} | {versus} |"
        )
    others = [row for row in correct_by_row if row != "direct"]
    if len(others) > 1:
        lines += ["", "Each row against each later one, on the same items (exact McNemar):"]
        lines += [
            f"- {a} -> {b}: {paired_change(correct_by_row[a], correct_by_row[b])}"
            for k, a in enumerate(others)
            for b in others[k + 1 :]
        ]
    choice_path = args.out / "choice.json"
    if choice_path.exists():
        choice = json.loads(choice_path.read_text())
        lines += ["", f"Tuning split ({choice['tune_items']} items, unsteered {choice['tune_direct']:.1%}):"]
        lines += [f"- {k}: {v:.1%}" for k, v in choice["tune_scores"].items()]
        lines += [f"- chosen: {choice['unlock']['name']} at {choice['unlock']['strength']:g}"]
    lines += ["", f"Served in {args.dtype}, greedy, at most {args.max_tokens} new tokens."]
    text = "\n".join(lines)
    (args.out / "report.md").write_text(text + "\n")
    for figure in draw_all(args.out, ROWS):
        print(f"wrote {figure}")
    return text


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["build", "tune", "eval", "report", "all"])
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--target", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--source-extracted", type=Path, help="`unlock extract` of the source to reuse")
    p.add_argument("--target-extracted", type=Path, help="`unlock extract` of the target, same prompts")
    p.add_argument("--data-dir", type=Path, default=REPO / "bench" / "cache" / "data")
    p.add_argument("-n", type=int, default=64, help="MATH problems for extraction (when not reused)")
    p.add_argument(
        "--candidate",
        nargs=2,
        action="append",
        metavar=("NAME", "ALIGN_ARGS"),
        required=True,
        help="a cross-model capability: `unlock align` arguments (repeatable; tuned against each other)",
    )
    p.add_argument("--strengths", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--same-strengths", type=float, nargs="+", default=[0.05, 0.1])
    p.add_argument("--eval-range", default="0:200", help="GSM8K test items evaluated (start:stop)")
    p.add_argument("--tune-range", default="1000:1100", help="GSM8K test items for tuning, never evaluated")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--max-tokens", type=int, help="at most this many new tokens (default: --out's, else 512)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="the server's dtype (default: --out's, else float32; bfloat16: 2x faster on an avx512_bf16 CPU)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random control")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.extract_data = args.data_dir / "math_test.jsonl"
    args.eval_items = range(*map(int, args.eval_range.split(":")))
    args.tune_items = range(*map(int, args.tune_range.split(":")))
    if set(args.eval_items) & set(args.tune_items):
        p.error("--eval-range and --tune-range overlap: choices must be made on unevaluated items")
    try:
        settings = resolve_settings(
            args.out, {"dtype": args.dtype, "max_tokens": args.max_tokens}, record=args.stage != "report"
        )
    except SettingsMismatch as e:
        p.error(str(e))
    args.dtype, args.max_tokens = settings["dtype"], settings["max_tokens"]
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    gsm = read_jsonl(args.data_dir / "gsm8k_test.jsonl")
    if args.stage in ("build", "all"):
        build_candidates(args)
    if args.stage in ("tune", "eval", "all"):
        paths = build_candidates(args)
        choice_path = args.out / "choice.json"
        choice = json.loads(choice_path.read_text()) if choice_path.exists() else None
        if choice is not None:
            paths.update(build_controls(args, choice))
        with Server(args) as server:
            for name, path in paths.items():
                server.upload(name, path)
            if choice is None:
                choice = stage_tune(server, args, gsm)
                for name, path in build_controls(args, choice).items():
                    server.upload(name, path)
            if args.stage in ("eval", "all"):
                stage_eval(server, args, gsm, choice)
    if args.stage in ("report", "all"):
        print(stage_report(args))


if __name__ == "__main__":
    main()
