"""What steering costs: throughput and latency with the plugin absent, loaded but unused, and all steered.

One engine configuration, the same prompts and the same greedy decoding in every run; each configuration
runs in its own process (the plugin wraps vLLM process-wide), in the order given, repeated --rounds times
so that machine noise shows up as spread. Reported as ratios to the plugin-absent run of the same round.

  absent   VLLM_PLUGINS excludes `unlock`: plain vLLM
  unused   plugin and worker extension loaded, no request selects a capability
  rotate   every request steered with its own capability set (1-2 capabilities, own strengths), mode rotate
  add      the same in mode add (every token edited)

  .venv/bin/python bench/overhead/run.py --model bench/cache/models/smollm2 \
      --out bench/overhead/results/smollm2.json

Separate engine processes differ by more than the steering costs on a small CPU model (core placement,
compiled code, memory layout), so `--interleaved` also runs unused, rotate and add taking turns on ONE engine
with the plugin, many rounds, and reports ratios to unused: the cost of steering itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

CONFIGS = ("absent", "unused", "rotate", "add")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def prompts(n: int) -> list[str]:
    topics = ["rivers", "bread", "bridges", "comets", "violins", "glaciers", "markets", "owls"]
    return [f"Write a short paragraph about {topics[i % len(topics)]}, number {i}:\n" for i in range(n)]


def make_capabilities(model: str, mode: str, count: int, out_dir: Path) -> list[Path]:
    """`count` random capabilities for `model` (every layer), so each request can have its own set."""
    import torch
    from transformers import AutoConfig

    from unlock import Capability, TargetInfo

    config = AutoConfig.from_pretrained(model)
    text = getattr(config, "text_config", None) or config
    layers, hidden = text.num_hidden_layers, text.hidden_size
    info = TargetInfo(config.architectures[0], layers, hidden, model)
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i in range(count):
        directions = torch.randn(layers, hidden, generator=generator)
        path = out_dir / f"{mode}-{i}.safetensors"
        Capability.from_directions(f"{mode}{i}", directions, list(range(layers)), mode, 0.05, info).save(path)
        paths.append(path)
    return paths


async def start_engine(args: argparse.Namespace, plugin: bool):
    """The engine every configuration runs on; the plugin's engine arguments when `plugin`."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = dict(
        model=args.model,
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=args.concurrency,
        kv_cache_memory_bytes=2 << 30,
        seed=0,
        enforce_eager=args.eager,
    )
    if plugin:
        import unlock_vllm

        engine_args.update(unlock_vllm.engine_kwargs(max_capabilities=64))
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))


async def steering_selections(engine, args: argparse.Namespace, mode: str) -> list[str]:
    """Register 16 capabilities in `mode`; each request gets its own set of 1-2 with its own strengths."""
    from unlock_vllm.request import encode_selection

    from unlock import Capability

    caps = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in make_capabilities(args.model, mode, 16, Path(tmp)):
            cap = Capability.load(path)
            replies = await engine.collective_rpc("unlock_register", args=(str(path), cap.sha256))
            if not all(r.get("ok") for r in replies):
                raise RuntimeError(f"registration failed: {replies}")
            caps.append(cap)
    selections = []
    for i in range(args.requests):
        chosen = [caps[i % 16]] + ([caps[(i * 7 + 3) % 16]] if i % 2 else [])
        chosen = list({c.sha256: c for c in chosen}.values())
        selections.append(
            encode_selection([(c.sha256, 0.02 + 0.01 * ((i + j) % 5), c.mode) for j, c in enumerate(chosen)])
        )
    return selections


async def measure(engine, args: argparse.Namespace, label: str, selections: list[str | None]) -> dict:
    """Send the load (`args.requests` prompts, `args.concurrency` at a time) and time every token."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    async def one(i: int, prompt: str) -> dict:
        params = SamplingParams(
            temperature=0.0,
            max_tokens=args.max_tokens,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
            extra_args={"unlock": selections[i]} if selections[i] else None,
        )
        sent = time.perf_counter()
        stamps: list[float] = []
        async for out in engine.generate(prompt, params, request_id=f"{label}-{i}-{uuid.uuid4().hex[:8]}"):
            stamps.extend([time.perf_counter()] * len(out.outputs[0].token_ids))
        return {
            "ttft": stamps[0] - sent,
            "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
            "tokens": len(stamps),
        }

    sem = asyncio.Semaphore(args.concurrency)

    async def limited(i: int, prompt: str) -> dict:
        async with sem:
            return await one(i, prompt)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(i, p) for i, p in enumerate(prompts(args.requests))))
    elapsed = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    itl = [x for r in results for x in r["itl"]]
    ttft = [r["ttft"] for r in results]
    return {
        "config": label,
        "elapsed_s": elapsed,
        "tokens": tokens,
        "throughput_tok_s": tokens / elapsed,
        "ttft_p50_ms": 1e3 * percentile(ttft, 0.5),
        "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
        "itl_p50_ms": 1e3 * percentile(itl, 0.5),
        "itl_p99_ms": 1e3 * percentile(itl, 0.99),
    }


async def run_config(args: argparse.Namespace) -> dict:
    """One configuration in this process: start the engine, send a warm-up batch, then the timed load."""
    start = time.perf_counter()
    engine = await start_engine(args, plugin=args.config != "absent")
    startup = time.perf_counter() - start
    selections: list[str | None] = [None] * args.requests
    if args.config in ("rotate", "add"):
        selections = await steering_selections(engine, args, args.config)
    warm = argparse.Namespace(**{**vars(args), "requests": args.concurrency})
    await measure(engine, warm, f"warm-{args.config}", selections)
    result = await measure(engine, args, args.config, selections)
    engine.shutdown()
    return {"startup_s": startup, **result}


async def run_interleaved(args: argparse.Namespace) -> list[dict]:
    """unused, rotate and add on ONE engine with the plugin, taking turns (the first config shifts each
    round): what differs between engine processes (core placement, compiled code, memory layout) cancels
    out, so the ratios measure the steering alone."""
    engine = await start_engine(args, plugin=True)
    selections = {"unused": [None] * args.requests}
    for mode in ("rotate", "add"):
        selections[mode] = await steering_selections(engine, args, mode)
    warm = argparse.Namespace(**{**vars(args), "requests": args.concurrency})
    for config, chosen in selections.items():
        await measure(engine, warm, f"warm-{config}", chosen)
    names, runs = list(selections), []
    for round_ in range(args.rounds):
        for config in names[round_ % 3 :] + names[: round_ % 3]:
            result = {**await measure(engine, args, config, selections[config]), "round": round_}
            runs.append(result)
            print(json.dumps(result), flush=True)
    engine.shutdown()
    return runs


def child_env(config: str) -> dict[str, str]:
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    if config == "absent":
        env["VLLM_PLUGINS"] = "no-such-plugin"  # an allow-list that excludes `unlock`
    return env


def summarise(runs: list[dict], base_config: str) -> str:
    lines = [
        f"| round | config | tok/s | ratio to {base_config} | TTFT p50 / p99 ms | ITL p50 / p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    ratios: dict[str, list[float]] = {}
    for r in runs:
        base = next(b for b in runs if b["round"] == r["round"] and b["config"] == base_config)
        ratio = r["throughput_tok_s"] / base["throughput_tok_s"]
        ratios.setdefault(r["config"], []).append(ratio)
        lines.append(
            f"| {r['round']} | {r['config']} | {r['throughput_tok_s']:.1f} | {ratio:.3f} | "
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
            f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} |"
        )
    lines.append("")
    for config, values in ratios.items():
        median = statistics.median(values)
        lines.append(f"{config}: throughput ratio to {base_config}, median over rounds = {median:.3f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's torch.compile)")
    p.add_argument(
        "--interleaved",
        action="store_true",
        help="unused, rotate and add taking turns on one engine (ratios to unused; no absent run)",
    )
    p.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)  # set in the child process
    args = p.parse_args()
    if args.config:
        print(json.dumps(asyncio.run(run_config(args))))
        return
    if args.interleaved:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        runs = asyncio.run(run_interleaved(args))
    else:
        runs = run_separately(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "eager": args.eager,
        "interleaved": args.interleaved,
        "cpus": os.cpu_count(),
    }
    args.out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    table = summarise(runs, "unused" if args.interleaved else "absent")
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


def run_separately(args: argparse.Namespace) -> list[dict]:
    """Each configuration in its own engine process, in the order given, --rounds times."""
    runs = []
    for round_ in range(args.rounds):
        for config in args.configs:
            cmd = [sys.executable, __file__, "--config", config, *sys.argv[1:]]
            done = subprocess.run(cmd, env=child_env(config), capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{config} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["round"] = round_
            runs.append(result)
            print(json.dumps(result), flush=True)
    return runs


if __name__ == "__main__":
    main()
