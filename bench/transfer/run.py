"""The paper's chain-of-thought transfer at small scale, measured through the served path (HTTP, batched).

Stages (each resumable; results are appended per item to JSONL files under --out and skipped when present):
  build   artifacts: cross-model (source -> target) at each rank; same-model (the target's own direction)
  tune    strength x rank on a held-out GSM8K split that is never evaluated
  eval    the evaluated GSM8K items: target direct, target + UNLOCK, target cot, target + same-model direction
  report  tables with 95% Wilson intervals and exact McNemar tests, and the figures (plots.py)

Example (the headline, 1.5B -> 0.5B; models come from bench/fetch_assets.py):
  .venv/bin/python bench/transfer/run.py all \
      --source bench/cache/models/qwen15 --target bench/cache/models/qwen05 \
      --out bench/transfer/results/qwen15-to-qwen05
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).parent))
from plots import draw_all  # noqa: E402
from scoring import gold_answer, mcnemar_exact, parse_answer, wilson_interval  # noqa: E402

from unlock.templates import ANSWER_CLOSE, BUILTIN_TEMPLATES, render  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
ADMIN_KEY = "bench-admin"


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def run_logged(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with log.open("w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def build_artifacts(args: argparse.Namespace) -> dict[str, Path]:
    """`unlock extract` once per source model, `unlock align` per rank; skipped for files that exist.

    Cross-model: source -> target through the rank-k map. Same-model (the upper reference): the target's own
    direction, used as is (no map, so nothing is lost to the rank-k projection).
    """
    art_dir = args.out / "artifacts"
    art_dir.mkdir(parents=True, exist_ok=True)
    extract = [
        "--data",
        str(args.extract_data),
        "--field",
        args.extract_field,
        "-n",
        str(args.n),
        "--locked-template",
        "direct",
        "--unlocked-template",
        "cot",
        "--aggregation",
        "mean",
        "--batch-size",
        "8",
    ]
    for role, model in (("source", args.source), ("target", args.target)):
        path = art_dir / f"extracted-{role}.safetensors"
        if not path.exists():
            run_logged(
                [str(BIN / "unlock"), "extract", "--source-locked", str(model), *extract, "-o", str(path)],
                art_dir / f"extract-{role}.log",
            )
    paths = {}
    for rank in args.ranks:
        name = f"xfer-r{rank}"
        paths[name] = art_dir / f"{name}.safetensors"
        if not paths[name].exists():
            run_logged(
                [
                    str(BIN / "unlock"),
                    "align",
                    "--extracted",
                    str(art_dir / "extracted-source.safetensors"),
                    "--target",
                    str(args.target),
                    "--rank",
                    str(rank),
                    *(["--center"] if args.center else []),
                    *shlex.split(args.align_args),
                    "--mode",
                    "rotate",
                    "--strength",
                    "0.1",
                    "--name",
                    name,
                    "-o",
                    str(paths[name]),
                ],
                art_dir / f"align-{name}.log",
            )
    paths["same"] = art_dir / "same.safetensors"
    if not paths["same"].exists():
        same_model_capability(art_dir / "extracted-target.safetensors", args.target).save(paths["same"])
    return paths


def same_model_capability(extracted_path: Path, target: Path):
    """The target's own cot-minus-direct direction at every layer, as a capability (no alignment)."""
    from transformers import AutoConfig

    from unlock import Capability, TargetInfo
    from unlock.pipeline import Extracted

    extracted = Extracted.load(extracted_path)
    config = AutoConfig.from_pretrained(target)
    num_layers, hidden = extracted.directions.shape
    info = TargetInfo(config.architectures[0], num_layers, hidden, str(target))
    return Capability.from_directions(
        "same",
        extracted.directions,
        layers=list(range(num_layers)),
        mode="rotate",
        default_strength=0.1,
        target=info,
        metadata={"source_locked": str(target), "n": extracted.metadata["n"]},
    )


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
            str(BIN / "unlock-serve"),
            "--model",
            str(a.target),
            "--served-model-name",
            "target",
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--admin-key",
            ADMIN_KEY,
            "--capabilities-dir",
            str(a.out / "registry"),
            "--dtype",
            "float32",
            "--max-model-len",
            "1536",
            "--kv-cache-memory-bytes",
            str(4 << 30),
            "--max-num-seqs",
            str(a.batch),
        ]
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
    capabilities: dict[str, float] | None,
    out_file: Path,
    args: argparse.Namespace,
) -> None:
    """Greedy completions for the items not yet in `out_file`, `args.batch` at a time."""
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


def stage_tune(server: Server, args: argparse.Namespace, gsm: list[dict]) -> dict:
    """Pick (rank, strength) for UNLOCK and the strength of the same-model row on the tuning split."""
    items = [(i, gsm[i]) for i in args.tune_items]
    direct = BUILTIN_TEMPLATES["direct"]
    tune_dir = args.out / "tune"
    tune_dir.mkdir(parents=True, exist_ok=True)
    scores: dict[str, dict[str, float]] = {}
    same = ["same"] if "same-model" in args.rows else []  # its tuning is long: only when its row is wanted
    for name in [f"xfer-r{r}" for r in args.ranks] + same:
        for strength in args.strengths:
            out = tune_dir / f"{name}@{strength}.jsonl"
            asyncio.run(evaluate(server, f"{name}@{strength}", items, direct, {name: strength}, out, args))
            correct, total = accuracy(out, set(args.tune_items))
            scores.setdefault(name, {})[str(strength)] = correct / max(total, 1)
    xfer = max(((n, s) for n in scores if n != "same" for s in scores[n]), key=lambda k: scores[k[0]][k[1]])
    choice = {
        "unlock": {"name": xfer[0], "strength": float(xfer[1])},
        "tune_scores": scores,
        "tune_items": len(items),
    }
    if same:
        best = max(scores["same"], key=lambda s: scores["same"][s])
        choice["same"] = {"name": "same", "strength": float(best)}
    (args.out / "choice.json").write_text(json.dumps(choice, indent=2))
    return choice


def stage_eval(server: Server, args: argparse.Namespace, gsm: list[dict], choice: dict) -> None:
    # The unsteered target on the tuning split too: the baseline of the accuracy-against-strength figure.
    tune = [(i, gsm[i]) for i in args.tune_items]
    direct = BUILTIN_TEMPLATES["direct"]
    asyncio.run(evaluate(server, "direct", tune, direct, None, args.out / "tune" / "direct.jsonl", args))
    items = [(i, gsm[i]) for i in args.eval_items]
    rows = {
        "direct": (BUILTIN_TEMPLATES["direct"], None),
        "unlock": (BUILTIN_TEMPLATES["direct"], {choice["unlock"]["name"]: choice["unlock"]["strength"]}),
        "cot": (BUILTIN_TEMPLATES["cot"], None),
    }
    if "same" in choice:
        rows["same-model"] = (BUILTIN_TEMPLATES["direct"], {"same": choice["same"]["strength"]})
    for row in args.rows:
        template, caps = rows[row]
        asyncio.run(evaluate(server, row, items, template, caps, args.out / f"eval-{row}.jsonl", args))


def stage_report(args: argparse.Namespace) -> str:
    indices = set(args.eval_items)
    results = {}
    for row in ("direct", "unlock", "cot", "same-model"):
        path = args.out / f"eval-{row}.jsonl"
        if path.exists():
            results[row] = {r["index"]: r for r in read_jsonl(path) if r["index"] in indices}
    lines = [
        "| row | correct | n | accuracy | 95% CI | mean tokens | hit token cap |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, res in results.items():
        n = len(res)
        correct = sum(r["correct"] for r in res.values())
        lo, hi = wilson_interval(correct, n)
        toks = sum(r["tokens"] for r in res.values()) / max(n, 1)
        capped = sum(r["finish"] == "length" for r in res.values())
        lines.append(
            f"| {row} | {correct} | {n} | {correct / max(n, 1):.1%} | [{lo:.1%}, {hi:.1%}] | {toks:.0f} | "
            f"{capped} |"
        )
    if "direct" in results:
        for row in ("unlock", "same-model", "cot"):
            if row not in results:
                continue
            common = results["direct"].keys() & results[row].keys()
            b = sum(results[row][i]["correct"] and not results["direct"][i]["correct"] for i in common)
            c = sum(results["direct"][i]["correct"] and not results[row][i]["correct"] for i in common)
            lines.append(
                f"\n{row} vs direct on {len(common)} paired items: {b} gained, {c} lost, "
                f"exact McNemar p = {mcnemar_exact(b, c):.3g}"
            )
    text = "\n".join(lines)
    (args.out / "report.md").write_text(text + "\n")
    for figure in draw_all(args.out):
        print(f"wrote {figure}")
    return text


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["build", "tune", "eval", "report", "all"])
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--target", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=REPO / "bench" / "cache" / "data")
    p.add_argument("--extract-field", default="problem")
    p.add_argument("-n", type=int, default=128, help="MATH problems for extraction and alignment")
    p.add_argument("--ranks", type=int, nargs="+", default=[64])
    p.add_argument(
        "--center",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="centre the activations before the alignment fit (`unlock align --center`)",
    )
    p.add_argument(
        "--align-args",
        default="",
        help="more `unlock align` arguments, e.g. '--align-positions all --align-data F --capture-dir D "
        "--ridge 0.1'",
    )
    p.add_argument("--strengths", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--eval-range", default="0:200", help="GSM8K test items evaluated (start:stop)")
    p.add_argument("--tune-range", default="1000:1060", help="GSM8K test items for tuning, never evaluated")
    p.add_argument("--rows", nargs="+", default=["direct", "unlock", "cot", "same-model"])
    p.add_argument("--max-tokens", type=int, default=320)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.extract_data = args.data_dir / "math_test.jsonl"
    args.eval_items = range(*map(int, args.eval_range.split(":")))
    args.tune_items = range(*map(int, args.tune_range.split(":")))
    if set(args.eval_items) & set(args.tune_items):
        p.error(
            "--eval-range and --tune-range overlap: strength and rank must be chosen on unevaluated items"
        )
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    gsm = read_jsonl(args.data_dir / "gsm8k_test.jsonl")
    if args.stage in ("build", "all"):
        build_artifacts(args)
    if args.stage in ("tune", "eval", "all"):
        paths = build_artifacts(args)
        with Server(args) as server:
            for name, path in paths.items():
                server.upload(name, path)
            choice_path = args.out / "choice.json"
            choice = (
                json.loads(choice_path.read_text()) if choice_path.exists() else stage_tune(server, args, gsm)
            )
            if args.stage in ("eval", "all"):
                stage_eval(server, args, gsm, choice)
    if args.stage in ("report", "all"):
        print(stage_report(args))


if __name__ == "__main__":
    main()
