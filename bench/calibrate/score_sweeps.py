"""The `unlock calibrate` rule on the saved outputs of issue 14's labelled sweeps, scored offline.

For each tuning file (one strength) of a sweep folder and each item, the first 32 tokens of the saved output
are scored by the target (HF transformers, bf16) after the item's own `direct` prompt and after the next
item's, giving the PMI that `unlock.calibrate` asks the server for; the report then applies the same rule
(switched, on topic, qualified fraction per strength) and puts it beside the file's accuracy, which the
rule never sees. Resumable: finished items are skipped on a rerun.

Usage: .venv/bin/python bench/calibrate/score_sweeps.py MODEL_DIR SWEEP_TUNE_DIR OUT.jsonl [--report]
e.g.   bench/cache/models/qwen05 bench/transfer/results/issue14/qwen15-to-qwen05/tune \
       bench/calibrate/results/qwen15-to-qwen05.jsonl
"""

import collections
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from unlock.calibrate import MIN_PMI  # noqa: E402
from unlock.templates import BUILTIN_TEMPLATES, render  # noqa: E402

HEAD_TOKENS = 32


def score(model_dir: str, tune_dir: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    gsm = [json.loads(line) for line in open(REPO / "bench/cache/data/gsm8k_test.jsonl")]
    done = {(r["file"], r["index"]) for r in map(json.loads, open(out))} if out.exists() else set()

    def logprobs(prompt: str, ids: list[int]) -> list[float]:
        prefix = tok(prompt, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([prefix + ids])).logits[0, len(prefix) - 1 : -1].float()
        return torch.log_softmax(logits, -1)[torch.arange(len(ids)), torch.tensor(ids)].tolist()

    direct = BUILTIN_TEMPLATES["direct"]
    first = ("xfer", "direct")  # the transferred rows first, then the same-model ones
    files = sorted(tune_dir.glob("*.jsonl"), key=lambda p: (not p.stem.startswith(first), p.stem))
    with open(out, "a") as sink:
        for path in files:
            rows = [json.loads(line) for line in open(path)]
            order = sorted(r["index"] for r in rows)
            other = {i: order[(k + 1) % len(order)] for k, i in enumerate(order)}
            for r in rows:
                if (path.stem, r["index"]) in done:
                    continue
                ids = tok(r["text"], add_special_tokens=False).input_ids[:HEAD_TOKENS] or [tok.eos_token_id]
                record = {
                    "file": path.stem, "index": r["index"], "correct": r["correct"], "tokens": r["tokens"],
                    "lp_own": logprobs(render(direct, gsm[r["index"]]["question"]), ids),
                    "lp_other": logprobs(render(direct, gsm[other[r["index"]]]["question"]), ids),
                    "head": r["text"][:40],
                }  # fmt: skip
                sink.write(json.dumps(record) + "\n")
                sink.flush()
            print(path.stem, flush=True)


def report(out: Path) -> None:
    by = collections.defaultdict(dict)
    for r in map(json.loads, open(out)):
        by[r["file"]][r["index"]] = r
    base = by["direct"]
    pmi = {f: {i: sum(r["lp_own"]) - sum(r["lp_other"]) for i, r in rows.items()} for f, rows in by.items()}
    for name, rows in by.items():
        items = [i for i in rows if i in base]
        switched = [i for i in items if rows[i]["head"].strip() != base[i]["head"].strip()]
        qualified = [i for i in switched if pmi[name][i] >= max(pmi["direct"][i], MIN_PMI)]
        accuracy = sum(rows[i]["correct"] for i in items) / len(items)
        n = len(items)
        print(f"{name:16s} items={n:3d} accuracy={accuracy:.3f} switched={len(switched) / n:.2f} "
              f"qualified={len(qualified) / n:.2f}")  # fmt: skip


if __name__ == "__main__":
    if "--report" in sys.argv:
        report(Path(sys.argv[3]))
    else:
        score(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
