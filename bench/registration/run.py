"""Registration latency: from the start of an upload to the first token of a request steered by it, on a
server under load.

One `unlock-serve` on --model. `--concurrency` streaming requests run all the time (half unsteered, half
steered by a resident capability). Then, --repeats times: a fresh capability artifact for the served model
(low-rank factors of --rank, random content, so every upload is new content) is uploaded, and the moment the
upload answers, a streamed request steered by it is sent; an unsteered request sent at the same moment gives
the time to first token the load alone costs. The capability is deleted before the next repeat.

  .venv/bin/python bench/registration/run.py --model bench/cache/models/smollm2 --eager \
      --out bench/registration/results/smollm2.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path += [str(ROOT), str(ROOT / "tests")]
from serve_harness import ServerProcess  # noqa: E402

ADMIN = {"Authorization": "Bearer bench-admin"}
PROMPT = "Question: A farmer has 12 cows and buys 7 more. How many cows does the farmer have?\nAnswer:"


def artifact_bytes(model: Path, name: str, rank: int, seed: int) -> bytes:
    """A cross-model-shaped capability for `model`: source directions and factors V_s, M, V_t per layer."""
    import torch
    from transformers import AutoConfig

    from unlock import Capability, TargetInfo

    config = AutoConfig.from_pretrained(model)
    layers, hidden = config.num_hidden_layers, config.hidden_size
    g = torch.Generator().manual_seed(seed)
    v_s = torch.linalg.qr(torch.randn(layers, hidden, rank, generator=g)).Q
    v_t = torch.linalg.qr(torch.randn(layers, hidden, rank, generator=g)).Q
    m = torch.randn(layers, rank, rank, generator=g) / rank**0.5
    directions = torch.randn(layers, hidden, generator=g)
    info = TargetInfo(config.architectures[0], layers, hidden, str(model))
    capability = Capability.from_factors(
        name, directions, v_s, m, v_t, list(range(layers)), "rotate", 0.1, info
    )
    return capability.to_bytes()


async def first_token_s(client: httpx.AsyncClient, started: float, capabilities: list[str] | None) -> float:
    """Seconds from `started` to the first streamed token of one request."""
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    if capabilities:
        body["capabilities"] = capabilities
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.perf_counter() - started
    raise RuntimeError("the stream ended without a token")


async def background_load(url: str, concurrency: int, stop: asyncio.Event, counts: dict) -> None:
    async def worker(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            while not stop.is_set():
                body = {"model": "m", "prompt": f"{PROMPT} ({i})", "max_tokens": 64, "temperature": 0}
                if i % 2:
                    body["capabilities"] = ["resident"]
                r = await client.post("/v1/completions", json=body)
                counts[r.status_code] = counts.get(r.status_code, 0) + 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


async def measure(url: str, args: argparse.Namespace) -> dict:
    stop, counts = asyncio.Event(), {}
    load = asyncio.create_task(background_load(url, args.concurrency, stop, counts))
    await asyncio.sleep(args.warmup)
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for k in range(args.repeats):
            data = artifact_bytes(args.model, f"fresh{k}", args.rank, seed=100 + k)
            started = time.perf_counter()
            r = await client.post(
                "/v1/capabilities", params={"name": f"fresh{k}"}, content=data, headers=ADMIN
            )
            if r.status_code != 201:
                raise RuntimeError(f"upload failed: {r.status_code} {r.text}")
            uploaded = time.perf_counter() - started
            steered, plain = await asyncio.gather(
                first_token_s(client, started, [f"fresh{k}"]),
                first_token_s(client, time.perf_counter(), None),
            )
            rows.append(
                {
                    "bytes": len(data),
                    "upload_s": round(uploaded, 3),
                    "upload_to_first_steered_token_s": round(steered, 3),
                    "plain_ttft_s": round(plain, 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            await client.delete(f"/v1/capabilities/fresh{k}", headers=ADMIN)
    stop.set()
    await load
    return {"repeats": rows, "load_responses_by_status": counts}


def summary(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows]
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="HF folder to serve")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16, help="background requests kept running")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=float, default=20, help="seconds of load before the first upload")
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (no torch.compile warm-up)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="unlock-registration-"))
    flags = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", str(2 * args.concurrency)]
    flags += ["--enforce-eager"] if args.eager else []
    server = ServerProcess(
        ["--model", str(args.model), "--served-model-name", "m", *flags, "--admin-key", "bench-admin",
         "--capabilities-dir", str(work / "registry"), "--max-upload-bytes", str(256 << 20)],
        work / "server.log",
        env={"UNLOCK_CACHE_DIR": str(work / "cache")},
    ).start()  # fmt: skip
    try:
        resident = artifact_bytes(args.model, "resident", args.rank, seed=1)
        httpx.post(
            f"{server.url}/v1/capabilities", params={"name": "resident"}, content=resident, headers=ADMIN,
            timeout=600,
        ).raise_for_status()  # fmt: skip
        result = asyncio.run(measure(server.url, args))
    finally:
        server.stop()
    rows = result["repeats"]
    report = {
        "model": str(args.model),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "server_flags": flags,
        "rank": args.rank,
        "concurrency": args.concurrency,
        "artifact_bytes": rows[0]["bytes"],
        "upload_s": summary(rows, "upload_s"),
        "upload_to_first_steered_token_s": summary(rows, "upload_to_first_steered_token_s"),
        "plain_ttft_s": summary(rows, "plain_ttft_s"),
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "repeats"}, indent=2))


if __name__ == "__main__":
    main()
