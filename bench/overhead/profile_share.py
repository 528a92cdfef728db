"""Share of a process's samples spent in given functions, from `py-spy record --format raw` files.

Throughput on a small shared CPU varies by more than steering costs, so the direct measure is a sampling
profile of the engine's worker process while a configuration runs:

  py-spy record -d 10 --rate 50 --format raw -p <pid of VLLM::Worker> -o worker-rotate-1.txt
  .venv/bin/python bench/overhead/profile_share.py worker-*.txt

A sample counts for a function when the function is anywhere on its stack (inclusive time).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

FUNCTIONS = (
    "_steer_cpu",
    "steer_hidden",
    "write_step",
    "_prepare_inputs",
    "CompiledFxGraph",
    "cpu_attention",
)


def shares(path: Path, functions: tuple[str, ...]) -> tuple[int, dict[str, float]]:
    total, hits = 0, Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        for name in functions:
            if name in stack:
                hits[name] += int(count)
    return total, {name: hits[name] / max(total, 1) for name in functions}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--functions", nargs="+", default=list(FUNCTIONS))
    args = p.parse_args()
    print("| file | samples | " + " | ".join(args.functions) + " |")
    print("|---|---|" + "---|" * len(args.functions))
    for path in args.files:
        total, share = shares(path, tuple(args.functions))
        print(
            f"| {path.name} | {total} | "
            + " | ".join(f"{100 * share[f]:.1f}%" for f in args.functions)
            + " |"
        )


if __name__ == "__main__":
    main()
