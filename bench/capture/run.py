"""Capture throughput through unlock-serve against `unlock capture` with transformers (issue 25), in one run
on one machine and one model: every token's stream after every layer of N alignment texts, written as the
same resumable store by both.

  hf      `unlock capture --model <folder>` (transformers, float32, batch 8): its own copy of the weights
  served  `unlock capture --model-url <server>` against unlock-serve serving the same folder (float32, its
          default torch.compile), started before the clock starts: what a user who already serves the model
          pays

Each side runs in a process of its own; its wall time, tokens per second and peak resident memory (the
process and its children, sampled every 50 ms) are recorded, with the server's resident memory beside the
served client's. The two stores are compared chunk by chunk (cosine of the float16 rows, per layer).

  .venv/bin/python bench/capture/run.py [--model qwen05] [-n 64] [--out bench/capture/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "bench" / "transfer"))
from run import ADMIN_KEY, BIN, Server  # noqa: E402

from unlock.streams import Chunk  # noqa: E402

DATA = REPO / "bench" / "cache" / "data" / "align_math.jsonl"


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def timed(cmd: list[str], log: Path) -> dict:
    """Run `cmd`; its wall time and the peak resident memory of its process tree."""
    peak = 0
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, tree_rss(watched))
            time.sleep(0.05)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}); see {log}")
    return {"wall_s": round(wall, 2), "peak_rss_bytes": peak}


def store_chunks(root: Path) -> list[Chunk]:
    return [Chunk.open(p) for p in sorted(root.glob("*/chunk-*.safetensors"))]


def compare(hf: list[Chunk], served: list[Chunk], num_layers: int) -> dict:
    """Per layer, the lowest cosine between the two stores' rows (float16 as stored)."""
    by_name = {c.path.name: c for c in served}
    worst = []
    for layer in range(num_layers):
        cosines = []
        for chunk in hf:
            other = by_name[chunk.path.name]
            assert chunk.ids == other.ids, "the two captures tokenized differently"
            a, b = chunk.layer(layer).float(), other.layer(layer).float()
            cosines.append(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())
        worst.append(round(float(torch.stack(cosines).min()), 6))
    return {"min_cosine_per_layer": worst}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="qwen05", help="a folder under bench/cache/models")
    parser.add_argument("-n", type=int, default=64, help="alignment texts (default 64)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    folder = REPO / "bench" / "cache" / "models" / args.model
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--data", str(DATA), "-n", str(args.n)]
    with tempfile.TemporaryDirectory(prefix="capture-bench-") as tmp:
        work = Path(tmp)
        hf = timed(
            [str(BIN / "unlock"), "capture", "--model", str(folder), "--dtype", "float32", "--device", "cpu",
             "--batch-size", "8", "--capture-dir", str(work / "hf"), *common],
            args.out / f"{args.model}-hf.log",
        )  # fmt: skip
        serve = argparse.Namespace(target=folder, out=work, dtype="float32", max_tokens=1024, batch=64)
        started = time.perf_counter()
        with Server(serve) as server:
            server_start_s = round(time.perf_counter() - started, 1)
            served = timed(
                [str(BIN / "unlock"), "capture", "--model-url", server.url, "--admin-key", ADMIN_KEY,
                 "--capture-dir", str(work / "served"), *common],
                args.out / f"{args.model}-served.log",
            )  # fmt: skip
            served["server_rss_bytes"] = tree_rss(psutil.Process(server.proc.pid))
        hf_chunks, served_chunks = store_chunks(work / "hf"), store_chunks(work / "served")
        tokens = sum(len(ids) for chunk in hf_chunks for ids in chunk.ids)
        num_layers = _num_layers(hf_chunks[0])
        agreement = compare(hf_chunks, served_chunks, num_layers)
    for side in (hf, served):
        side["tokens_per_s"] = round(tokens / side["wall_s"], 1)
    result = {
        "model": args.model,
        "texts": args.n,
        "tokens": tokens,
        "layers": num_layers,
        "hf": hf,
        "served": {**served, "server_start_s": server_start_s},
        "throughput_ratio_served_over_hf": round(served["tokens_per_s"] / hf["tokens_per_s"], 2),
        "client_peak_rss_ratio_served_over_hf": round(served["peak_rss_bytes"] / hf["peak_rss_bytes"], 3),
        **agreement,
        "cpu": f"{psutil.cpu_count()} cores",
        "command": f".venv/bin/python bench/capture/run.py --model {args.model} -n {args.n}",
    }
    (args.out / f"{args.model}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def _num_layers(chunk: Chunk) -> int:
    from safetensors import safe_open

    with safe_open(str(chunk.path), framework="pt") as f:
        return int(f.metadata()["num_layers"])


if __name__ == "__main__":
    main()
