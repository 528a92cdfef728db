"""What the K-dependent parts of steering cost per step, K = 1, 8, 32 and every request different.

The engine-level sweep (`ksweep.py`) measures throughput, which on a small shared CPU moves by more than
steering costs. The parts of a step that could depend on K are few and measured here directly, in one
process, with every K interleaved in each repeat so that machine noise falls on all of them alike:
- `steer`: the per-layer op (the CPU kernel, `unlock.ops.steer_hidden`) on one decode step of the batch, in
  mode `add` (every token edited) and `rotate` (a prefill step: each request's last prompt token);
- `write_step`: the host layout of that step's per-token rows (`SteeringState.write_step`);
- `admit`: taking term rows for the batch's requests (equal selections share rows).
The model's own layer cost, for scale, is in the engine runs.

  .venv/bin/python bench/selections/op_cost.py --hidden 576 --batch 256 \\
      --out bench/selections/results/op_cost-576x256.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from unlock_vllm.registry import WorkerRegistry
from unlock_vllm.request import EXTRA_ARGS_KEY, encode_selection
from unlock_vllm.state import SteeringState

from unlock import Capability, TargetInfo
from unlock.ops import steer_hidden

CAPS = 32
PROMPT = 12  # tokens per prompt in the prefill step


def build(args: argparse.Namespace, mode: str, k: int, tmp: Path) -> tuple[SteeringState, dict]:
    """A worker's state with CAPS capabilities registered and the batch admitted with K selections."""
    registry = WorkerRegistry(64, 1, args.hidden, dtype=getattr(torch, args.dtype))
    target = TargetInfo("bench", 1, args.hidden, "bench")
    caps = []
    for i in range(CAPS):
        directions = torch.randn(1, args.hidden, generator=torch.Generator().manual_seed(i))
        path = tmp / f"{mode}{i}.safetensors"
        Capability.from_directions(f"{mode}{i}", directions, [0], mode, 0.05, target).save(path)
        cap = Capability.load(path)
        registry.register(str(path), cap.sha256)
        caps.append(cap)
    state = SteeringState([], args.batch, args.batch * PROMPT, registry, "bench", "NONE")
    params = []
    for i in range(args.batch):
        s = i % k
        cap = caps[s % CAPS]
        selection = encode_selection([(cap.sha256, 0.02 + 0.001 * (s // CAPS), mode)])
        params.append(SimpleNamespace(extra_args={EXTRA_ARGS_KEY: selection}))
    return state, {"params": params}


def timed(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6  # microseconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as vLLM's CPU worker here
    import tempfile

    ks = [1, 8, 32, args.batch]
    dtype = getattr(torch, args.dtype)
    ids = [f"r{i}" for i in range(args.batch)]
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("add", "rotate"):
            for k in ks:
                state, extra = build(args, mode, k, Path(tmp))
                for req_id, p in zip(ids, extra["params"], strict=True):
                    state.admit(req_id, p)
                if mode == "add":  # a decode step: one token per request, every token edited
                    layout = (
                        np.ones(args.batch, np.int64),
                        np.full(args.batch, PROMPT),
                        np.full(args.batch, PROMPT),
                    )
                else:  # a prefill step: each prompt whole, its last token rotated
                    layout = (
                        np.full(args.batch, PROMPT),
                        np.zeros(args.batch, np.int64),
                        np.full(args.batch, PROMPT),
                    )
                state.write_step(ids, *layout)
                tokens = int(layout[0].sum())
                table = state.registry.table
                op_args = (
                    torch.randn(tokens, args.hidden).to(dtype),
                    torch.randn(tokens, args.hidden).to(dtype),
                    table.dirs[0],
                    table.gate[0],
                    state.terms.cap,
                    state.terms.strength,
                    state.terms.op,
                    state.token_row,
                )
                rows_used = len(set(state.token_row[:tokens].tolist()) - {0})

                def admit(state=state, params=extra["params"]):
                    for req_id, p in zip(ids, params, strict=True):
                        state.admit(req_id, p)

                cases[(mode, k)] = {
                    "steer": lambda a=op_args: steer_hidden(*a),
                    "write_step": lambda s=state, lay=layout: s.write_step(ids, *lay),
                    "admit": admit,
                    "rows_used": rows_used,
                    "tokens": tokens,
                }
        times = {key: {part: [] for part in ("steer", "write_step", "admit")} for key in cases}
        for round_ in range(args.rounds):
            order = list(cases)
            order = order[round_ % len(order) :] + order[: round_ % len(order)]
            for key in order:
                for part in ("steer", "write_step", "admit"):
                    times[key][part].append(timed(cases[key][part], args.repeats if part != "admit" else 2))
    rows = []
    for (mode, k), parts in times.items():
        base = times[(mode, 1)]
        row = {
            "mode": mode,
            "k": k,
            "rows_used": cases[(mode, k)]["rows_used"],
            "tokens": cases[(mode, k)]["tokens"],
        }
        for part, samples in parts.items():
            row[f"{part}_us"] = statistics.median(samples)
            ratios = [a / b for a, b in zip(samples, base[part], strict=True)]
            row[f"{part}_vs_k1"] = statistics.median(ratios)
        rows.append(row)
    lines = [
        f"hidden {args.hidden}, batch {args.batch}, {args.dtype}, 1 thread; medians of {args.rounds} "
        f"interleaved rounds ({args.repeats} calls each; admit: the whole batch, 2 calls)",
        "",
        "| mode | K | term rows used | tokens | steer us/layer (vs K=1) | write_step us (vs K=1) "
        "| admit batch us (vs K=1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['k']} | {r['rows_used']} | {r['tokens']} | "
            f"{r['steer_us']:.1f} ({r['steer_vs_k1']:.3f}) | "
            f"{r['write_step_us']:.1f} ({r['write_step_vs_k1']:.3f}) | "
            f"{r['admit_us']:.0f} ({r['admit_vs_k1']:.3f}) |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1) + "\n"
    )
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
