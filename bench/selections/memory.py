"""Device bytes of the steering tables, before and after issue 11, for 7B and 70B configurations.

After: the tables the plugin allocates now (`unlock_vllm.tables`: the capability table and the term rows,
plus the per-token row buffer), built by the plugin's own classes on the meta device (shapes and dtypes,
no memory). Before: the tables of the previous design (commit 24953bd, `patches/unlock_vllm/state.py`):
`add_table` and `rot_table` [layers, max_num_seqs + 1, hidden] in the model dtype, `rot_map` [layers,
max_num_seqs + 1] int64 and two int64 index buffers, allocated here with the same shapes on meta.
Every figure is per GPU rank: the tables are replicated on tensor-parallel ranks (hidden is not split).

Usage: python bench/selections/memory.py [--out bench/selections/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from unlock_vllm.config import DEFAULT_MAX_CAPABILITIES
from unlock_vllm.request import MAX_SELECTED
from unlock_vllm.tables import CapabilityTable, TermRows

from unlock.ops import TOKEN_CLASSES

META = torch.device("meta")
MODELS = {  # decoder layers, hidden size
    "7B (Llama-2-7B: 32 x 4096)": (32, 4096),
    "70B (Llama-3-70B: 80 x 8192)": (80, 8192),
}
MAX_NUM_SEQS = (256, 1024)
MAX_TOKENS = 8192  # max_num_batched_tokens (the per-token buffers)
DTYPE = torch.bfloat16


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def before(layers: int, hidden: int, seqs: int) -> dict[str, int]:
    rows = seqs + 1
    tables = [torch.empty(layers, rows, hidden, dtype=DTYPE, device=META) for _ in range(2)]
    rot_map = torch.empty(layers, rows, dtype=torch.int64, device=META)
    indices = [torch.empty(MAX_TOKENS, dtype=torch.int64, device=META) for _ in range(2)]
    return {"per-request tables": nbytes(*tables, rot_map), "per-token indices": nbytes(*indices)}


def after(layers: int, hidden: int, seqs: int, capabilities: int) -> dict[str, int]:
    table = CapabilityTable(list(range(layers)), capabilities, hidden, DTYPE, META)
    terms = TermRows(1 + len(TOKEN_CLASSES) * seqs, MAX_SELECTED, META)
    token_row = torch.empty(MAX_TOKENS, dtype=torch.int64, device=META)
    return {
        "capability table": nbytes(table.dirs, table.gate),
        "term rows": nbytes(terms.cap, terms.strength, terms.op),
        "per-token rows": nbytes(token_row),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    parser.add_argument("--max-capabilities", type=int, default=DEFAULT_MAX_CAPABILITIES)
    args = parser.parse_args()
    records = []
    lines = [
        f"bf16 tables, max_num_batched_tokens {MAX_TOKENS}, max_capabilities {args.max_capabilities}, "
        "per rank",
        f"{'model':<30} {'max_num_seqs':>12} {'before':>12} {'after':>12}  after, by part",
    ]
    for name, (layers, hidden) in MODELS.items():
        for seqs in MAX_NUM_SEQS:
            old, new = before(layers, hidden, seqs), after(layers, hidden, seqs, args.max_capabilities)
            records.append(
                {"model": name, "layers": layers, "hidden": hidden, "max_num_seqs": seqs,
                 "max_capabilities": args.max_capabilities, "before": old, "after": new}
            )  # fmt: skip
            parts = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in new.items())
            old_mib, new_mib = sum(old.values()) / 2**20, sum(new.values()) / 2**20
            lines.append(f"{name:<30} {seqs:>12} {old_mib:>9.1f} MiB {new_mib:>8.1f} MiB  {parts}")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
