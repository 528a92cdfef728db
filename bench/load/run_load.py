"""Bounded load test of a real `unlock-serve` on 127.0.0.1 (not part of CI; see docs/HARDENING.md).

Phase "mixed": N requests at C concurrent, a third unsteered and the rest with different capability sets
(body field and `+name@s` model names), while a churn task uploads and deletes capabilities. Every 5xx and
timeout is counted; each request is compared token for token with the same request sent alone before.
Phase "overload": more concurrent requests than --max-concurrent-requests; the excess must be answered 429 at
once, never by a timeout. Writes a JSON report (and prints a summary).

    .venv/bin/python bench/load/run_load.py --out bench/load/results/tiny.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
# The launcher and artifact helper the server tests use; the root first, so `unlock` is the package and not
# the tests/unlock folder.
sys.path += [str(ROOT), str(ROOT / "tests")]

from serve_harness import TINY_ENGINE_FLAGS, ServerProcess, capability_bytes  # noqa: E402

PROMPTS = [
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?\nAnswer:",
    "Question: A train travels 60 miles in 2 hours. What is its speed?\nAnswer:",
    "Question: There are 12 eggs in a dozen. If Sara uses 4 eggs, how many are left?\nAnswer:",
    "Reason step by step before giving the final answer.",
]
# (label, body field, model suffix): what each steered kind selects; "plain" is unsteered.
KINDS = [
    ("plain", None, ""),
    ("a", ["a"], ""),
    ("b", {"b": 1.5}, ""),
    ("a+b", [{"name": "a", "strength": 2.0}, {"name": "b", "strength": -1.0}], ""),
    ("model:a@2", None, "+a@2"),
    ("add:c", ["c"], ""),
]


@dataclass
class Outcome:
    kind: str
    status: int | None  # None: no response (timeout or connection error)
    error: str = ""
    seconds: float = 0.0
    tokens: list[str] = field(default_factory=list)


def body(kind: tuple, prompt: str, max_tokens: int, model: str) -> dict:
    label, selection, suffix = kind
    out = {"model": model + suffix, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
           "logprobs": 1}  # fmt: skip
    if selection is not None:
        out["capabilities"] = selection
    return out


async def send(client: httpx.AsyncClient, kind: str, payload: dict) -> Outcome:
    start = time.monotonic()
    try:
        r = await client.post("/v1/completions", json=payload)
    except httpx.HTTPError as err:
        return Outcome(kind, None, f"{type(err).__name__}: {err}", time.monotonic() - start)
    seconds = time.monotonic() - start
    if r.status_code != 200:
        return Outcome(kind, r.status_code, r.text[:300], seconds)
    tokens = r.json()["choices"][0]["logprobs"]["tokens"]
    return Outcome(kind, 200, "", seconds, tokens)


async def churn(client: httpx.AsyncClient, stop: asyncio.Event, log: Counter) -> None:
    """Upload a fresh capability, use it once, delete it; again until the mixed phase ends."""
    i = 0
    while not stop.is_set():
        name = f"churn-{i}"
        up = await client.post("/v1/capabilities", content=capability_bytes(name, seed=1000 + i))
        log[f"upload {up.status_code}"] += 1
        use = await client.post("/v1/completions", json=body(("churn", [name], ""), PROMPTS[0], 4, "tiny"))
        log[f"churn request {use.status_code}"] += 1
        gone = await client.delete(f"/v1/capabilities/{name}")
        log[f"delete {gone.status_code}"] += 1
        i += 1


async def mixed(url: str, n: int, concurrency: int, max_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    plan = [(KINDS[0] if i % 3 == 0 else rng.choice(KINDS[1:]), rng.choice(PROMPTS)) for i in range(n)]
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        # The offline result: every (kind, prompt) pair sent alone, before any load.
        alone = {}
        for kind in KINDS:
            for prompt in PROMPTS:
                alone[kind[0], prompt] = await send(client, kind[0], body(kind, prompt, max_tokens, "tiny"))
        gate = asyncio.Semaphore(concurrency)
        churn_log: Counter = Counter()
        stop = asyncio.Event()

        async def one(kind: tuple, prompt: str) -> tuple[Outcome, str]:
            async with gate:
                return await send(client, kind[0], body(kind, prompt, max_tokens, "tiny")), prompt

        start = time.monotonic()
        churner = asyncio.create_task(churn(client, stop, churn_log))
        results = await asyncio.gather(*(one(k, p) for k, p in plan))
        stop.set()
        await churner
        wall = time.monotonic() - start
    statuses = Counter(str(o.status) for o, _ in results)
    compared = [(o, p) for o, p in results if o.status == 200]
    mismatched = [
        {"kind": o.kind, "prompt": p[:40], "alone": alone[o.kind, p].tokens, "loaded": o.tokens}
        for o, p in compared
        if o.tokens != alone[o.kind, p].tokens
    ]
    steered_differs = sum(
        alone[k[0], p].tokens != alone["plain", p].tokens for k in KINDS[1:] for p in PROMPTS
    )
    return {
        "requests": n,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "wall_s": round(wall, 2),
        "statuses": dict(statuses),
        "server_errors_5xx": sum(o.status is not None and o.status >= 500 for o, _ in results),
        "no_response": sum(o.status is None for o, _ in results),
        "kinds": dict(Counter(o.kind for o, _ in results)),
        "compared_with_alone": len(compared),
        "mismatched_with_alone": len(mismatched),
        "mismatches": mismatched[:5],
        "steered_pairs_differing_from_plain": f"{steered_differs}/{len(KINDS[1:]) * len(PROMPTS)}",
        "churn": dict(churn_log),
        "latency_s_max": round(max(o.seconds for o, _ in results), 2),
    }


async def overload(url: str, n: int, limit: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        payload = body(KINDS[1], PROMPTS[0], max_tokens, "tiny") | {"ignore_eos": True}
        results = await asyncio.gather(*(send(client, "a", payload) for _ in range(n)))
    refused = [o for o in results if o.status == 429]
    return {
        "requests": n,
        "limit": limit,
        "max_tokens": max_tokens,
        "statuses": dict(Counter(str(o.status) for o in results)),
        "no_response": sum(o.status is None for o in results),
        "server_errors_5xx": sum(o.status is not None and o.status >= 500 for o in results),
        "refusal_latency_s_max": round(max((o.seconds for o in refused), default=0.0), 3),
        "served_latency_s_max": round(max((o.seconds for o in results if o.status == 200), default=0.0), 2),
        "refusal_example": refused[0].error if refused else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="HF folder to serve; default: the tiny random test model")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--limit", type=int, default=40, help="the server's --max-concurrent-requests")
    parser.add_argument("--overload", type=int, default=120, help="concurrent requests in the overload phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="unlock-load-"))
    model = args.model
    if model is None:
        from tiny_models import TARGET, make_model

        model = make_model(TARGET, work / "tiny-target")
    flags = [*TINY_ENGINE_FLAGS, "--max-concurrent-requests", str(args.limit), "--max-num-seqs", "64"]
    server = ServerProcess(
        [
            "--model",
            str(model),
            "--served-model-name",
            "tiny",
            *flags,
            "--capabilities-dir",
            str(work / "reg"),
        ],
        work / "server.log",
        env={"UNLOCK_CACHE_DIR": str(work / "cache")},
    ).start()
    try:
        for name, seed, mode in (("a", 1, "rotate"), ("b", 2, "rotate"), ("c", 3, "add")):
            r = httpx.post(f"{server.url}/v1/capabilities", content=capability_bytes(name, seed, mode, 3.0))
            r.raise_for_status()
        report = {
            "model": str(args.model or "tiny random qwen2 (tests/tiny_models.py TARGET)"),
            "server_flags": flags,
            "mixed": asyncio.run(
                mixed(server.url, args.requests, args.concurrency, args.max_tokens, args.seed)
            ),
            "overload": asyncio.run(overload(server.url, args.overload, args.limit, 64)),
            "health_after": httpx.get(f"{server.url}/health", timeout=30).status_code,
        }
    finally:
        report_exit = server.stop()
    report["server_exit_code"] = report_exit
    report["server_log_tracebacks"] = server.log().count("Traceback")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
