"""Throughput with K distinct steering selections in one batch (issue 11): K = 0 (no steering), 1, 8, 32 and
every request different, in modes `add` (every token edited) and `rotate` (the last prompt token).

One engine with the plugin (the server's default: torch.compile), one batch of --batch requests sent at
once (max_num_seqs = --batch), the same prompts and greedy decoding in every run. K distinct selections:
request i takes selection i mod K; selection s is capability s mod 32 (32 registered per mode) at strength
0.02 + 0.001 * (s // 32), so K = --batch gives every request its own selection. The configurations take
turns on that one engine, in an order that shifts every round, so that machine noise falls on all of them;
each round's throughput is divided by the same round's K = 1 (and K = 0) of the same mode.

  .venv/bin/python bench/selections/ksweep.py --model bench/cache/models/smollm2 \\
      --out bench/selections/results/smollm2-ksweep.json

Peers' published figure beside ours (EasySteer, a vLLM fork, its paper's K-sweep at batch 256): K = 32
distinct steering vectors run at 0.52x and K = 256 at 0.18x the throughput of K = 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

EASYSTEER_VS_K0 = {32: 0.52, 256: 0.18}  # at batch 256, from EasySteer's published sweep
CAPABILITIES_PER_MODE = 32


def prompts(n: int) -> list[str]:
    topics = ["rivers", "bread", "bridges", "comets", "violins", "glaciers", "markets", "owls"]
    return [f"Write a short paragraph about {topics[i % len(topics)]}, number {i % 10}:\n" for i in range(n)]


def make_capabilities(model: str, mode: str, out_dir: Path) -> list[Path]:
    import torch
    from transformers import AutoConfig

    from unlock import Capability, TargetInfo

    config = AutoConfig.from_pretrained(model)
    text = getattr(config, "text_config", None) or config
    layers, hidden = text.num_hidden_layers, text.hidden_size
    info = TargetInfo(config.architectures[0], layers, hidden, model)
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i in range(CAPABILITIES_PER_MODE):
        directions = torch.randn(layers, hidden, generator=generator)  # [layers, hidden]
        path = out_dir / f"{mode}-{i}.safetensors"
        Capability.from_directions(f"{mode}{i}", directions, list(range(layers)), mode, 0.05, info).save(path)
        paths.append(path)
    return paths


async def start_engine(args: argparse.Namespace):
    import unlock_vllm
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = dict(
        model=args.model,
        dtype=args.dtype,
        max_model_len=512,
        max_num_seqs=args.batch,
        kv_cache_memory_bytes=2 << 30,
        seed=0,
        enforce_eager=args.eager,
        **unlock_vllm.engine_kwargs(max_capabilities=2 * CAPABILITIES_PER_MODE),
    )
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))


async def register(engine, args: argparse.Namespace) -> dict[str, list]:
    from unlock import Capability

    caps: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            caps[mode] = []
            for path in make_capabilities(args.model, mode, Path(tmp)):
                cap = Capability.load(path)
                replies = await engine.collective_rpc("unlock_register", args=(str(path), cap.sha256))
                if not all(r.get("ok") for r in replies):
                    raise RuntimeError(f"registration failed: {replies}")
                caps[mode].append(cap)
    return caps


def selections(caps: list, k: int, batch: int) -> list[str | None]:
    """Request i's wire selection: selection i mod k (k = 0: none)."""
    from unlock_vllm.request import encode_selection

    if k == 0:
        return [None] * batch
    chosen = []
    for i in range(batch):
        s = i % k
        cap = caps[s % CAPABILITIES_PER_MODE]
        chosen.append(encode_selection([(cap.sha256, 0.02 + 0.001 * (s // CAPABILITIES_PER_MODE), cap.mode)]))
    return chosen


async def measure(engine, args: argparse.Namespace, label: str, chosen: list[str | None]) -> dict:
    """The whole batch sent at once; throughput = generated tokens / wall time until the last finishes."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    async def one(i: int, prompt: str) -> int:
        params = SamplingParams(
            temperature=0.0,
            max_tokens=args.max_tokens,
            ignore_eos=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
            extra_args={"unlock": chosen[i]} if chosen[i] else None,
        )
        final = None
        async for out in engine.generate(prompt, params, request_id=f"{label}-{i}-{uuid.uuid4().hex[:8]}"):
            final = out
        return len(final.outputs[0].token_ids)

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts(args.batch)))))
    elapsed = time.perf_counter() - start
    distinct = len({c for c in chosen if c})
    return {"config": label, "distinct": distinct, "tokens": tokens, "elapsed_s": elapsed,
            "throughput_tok_s": tokens / elapsed}  # fmt: skip


def summarize(runs: list[dict], args: argparse.Namespace) -> dict:
    by = {}
    for run in runs:
        by.setdefault((run["mode"], run["k"]), []).append(run)
    table = []
    for mode in args.modes:
        for k in args.ks:
            mine = by[(mode, k)]
            ratios_k1 = [r["throughput_tok_s"] / by[(mode, 1)][r["round"]]["throughput_tok_s"] for r in mine]
            ratios_k0 = [r["throughput_tok_s"] / by[(mode, 0)][r["round"]]["throughput_tok_s"] for r in mine]
            table.append(
                {
                    "mode": mode,
                    "k": k,
                    "distinct": mine[0]["distinct"],
                    "throughput_median": statistics.median(r["throughput_tok_s"] for r in mine),
                    "vs_k1_median": statistics.median(ratios_k1),
                    "vs_k1_min": min(ratios_k1),
                    "vs_k1_max": max(ratios_k1),
                    "vs_k0_median": statistics.median(ratios_k0),
                }
            )
    return {"rows": table, "easysteer_vs_k0_batch256": EASYSTEER_VS_K0}


def markdown(summary: dict, args: argparse.Namespace) -> str:
    lines = [
        f"Model {args.model}, {args.dtype}, {'eager' if args.eager else 'torch.compile'}, batch "
        f"{args.batch} (max_num_seqs), {args.max_tokens} new tokens per request, {args.rounds} rounds; "
        "medians over rounds.",
        "",
        "| mode | K | distinct selections | tok/s | vs K=1 (min-max) | vs K=0 "
        "| EasySteer vs K=0 (batch 256) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        easy = EASYSTEER_VS_K0.get(row["distinct"])
        lines.append(
            f"| {row['mode']} | {row['k']} | {row['distinct']} | {row['throughput_median']:.1f} | "
            f"{row['vs_k1_median']:.3f} ({row['vs_k1_min']:.3f}-{row['vs_k1_max']:.3f}) | "
            f"{row['vs_k0_median']:.3f} | {'' if easy is None else f'{easy:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    engine = await start_engine(args)
    startup = time.perf_counter() - start
    try:
        caps = await register(engine, args)
        configs = [(mode, k) for mode in args.modes for k in args.ks]
        chosen = {(mode, k): selections(caps[mode], k, args.batch) for mode, k in configs}
        for mode, k in configs:  # warm-up: every configuration once, untimed
            await measure(engine, args, f"warm-{mode}-{k}", chosen[(mode, k)])
        runs = []
        for round_ in range(args.rounds):
            shift = round_ % len(configs)
            for mode, k in configs[shift:] + configs[:shift]:
                result = await measure(engine, args, f"{mode}-{k}", chosen[(mode, k)])
                result.update(mode=mode, k=k, round=round_)
                runs.append(result)
                print(json.dumps(result), flush=True)
        # Proof that steering ran, and how many term rows the live selections shared.
        status = (await engine.collective_rpc("unlock_status"))[0]
    finally:
        engine.shutdown()
    return {"startup_s": startup, "runs": runs, "worker_status": status}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="add,rotate")
    parser.add_argument("--ks", default="0,1,8,32,all", help="'all': every request its own selection")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    args.ks = [args.batch if k == "all" else int(k) for k in args.ks.split(",")]
    if 0 not in args.ks or 1 not in args.ks:
        parser.error("--ks must include 0 and 1 (the baselines the ratios are taken to)")
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    # SIGTERM as SystemExit, so that `finally` shuts the engine-core child down instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    result = asyncio.run(run(args))
    summary = summarize(result["runs"], args)
    record = {"args": {k: v for k, v in vars(args).items() if k != "out"}, **result, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown(summary, args))
    print(markdown(summary, args))


if __name__ == "__main__":
    main()
