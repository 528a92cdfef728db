"""Does the alignment carry the direction? A check that needs no generation.

`unlock extract` run on the source and on the target with the same prompts and templates gives both models'
own cot-minus-direct directions and their activations on the same locked prompts. Fitting the map on those
activations (DESIGN step 3, `unlock.align`) and applying it to the source direction should land near the
target's own direction if the method's premise holds here. Reported per target layer, for several ranks
and numbers of fit prompts (always scored on the same held-out prompts):

- agreement: cosine between the mapped source direction and the target's own direction (a random direction
  in the target's space scores about 1/sqrt(d_t));
- the same cosine after removing from both the component along the target's mean locked activation (the
  part of a rotation along the stream itself does nothing);
- held-out error: |X_t - X_s W| / |X_t| on the held-out locked prompts.

  .venv/bin/python bench/transfer/diagnose.py \
      --source-extracted bench/transfer/results/qwen15-to-qwen05/artifacts/extracted-source.safetensors \
      --target-extracted bench/transfer/results/qwen15-to-qwen05/artifacts/extracted-target.safetensors \
      --out bench/transfer/results/qwen15-to-qwen05/diagnose
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from unlock.align import depth_map, fit_layer, relative_error, split_indices  # noqa: E402
from unlock.pipeline import Extracted  # noqa: E402


def sweep(
    source: Extracted, target: Extracted, ranks: list[int], fit_sizes: list[int], holdout: float, center: bool
) -> list:
    """One row per (rank, fit size, target layer); the held-out prompts are the same for every row."""
    n, n_s, _ = source.locked_acts.shape
    n_t = target.locked_acts.shape[1]
    fit_all, held = split_indices(n, holdout, seed=0)
    # Rotation moves the stream only by the part of r orthogonal to the stream, and the locked streams
    # share a large mean: agreement off that mean (per target layer) is what steering can use.
    means = torch.nn.functional.normalize(target.locked_acts.float().mean(0), dim=-1)  # [n_t, d_t]
    rows = []
    for rank in ranks:
        for size in sorted({min(size, len(fit_all)) for size in fit_sizes}):
            fit = fit_all[:size]
            for t in range(n_t):
                s = depth_map(t, n_s, n_t)
                layer_map = fit_layer(source.locked_acts[fit, s], target.locked_acts[fit, t], rank, center)
                mapped = layer_map.apply(source.directions[s]).float()
                own = target.directions[t].float()
                mean = means[t]
                mapped_off, own_off = mapped - (mapped @ mean) * mean, own - (own @ mean) * mean
                rows.append(
                    {
                        "rank": rank,
                        "n_fit": len(fit),
                        "target_layer": t,
                        "source_layer": s,
                        "agreement": float(torch.nn.functional.cosine_similarity(mapped, own, dim=0)),
                        "agreement_off_mean": float(
                            torch.nn.functional.cosine_similarity(mapped_off, own_off, dim=0)
                        ),
                        "heldout_error": relative_error(
                            layer_map, source.locked_acts[held, s], target.locked_acts[held, t]
                        ),
                    }
                )
    return rows


def plot(rows: list[dict], d_t: int, out: Path) -> Path:
    """Left: per layer, off the mean stream, at the most prompts. Right: mean over layers against prompts,
    whole cosine (solid) and off the mean stream (dashed)."""
    n_max = max(r["n_fit"] for r in rows)
    sizes = sorted({r["n_fit"] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for rank in sorted({r["rank"] for r in rows}):
        mine = [r for r in rows if r["rank"] == rank and r["n_fit"] == n_max]
        line = left.plot(
            [r["target_layer"] for r in mine],
            [r["agreement_off_mean"] for r in mine],
            marker=".",
            label=f"rank {rank}",
        )[0]
        for key, style in (("agreement", "-"), ("agreement_off_mean", "--")):
            means = []
            for n in sizes:
                values = [r[key] for r in rows if r["rank"] == rank and r["n_fit"] == n]
                means.append(sum(values) / len(values))
            right.plot(sizes, means, style, marker="o", color=line.get_color())
    for ax in (left, right):
        ax.axhline(1 / math.sqrt(d_t), color="grey", linestyle=":", label="random direction")
        ax.set_ylabel("cosine(mapped source direction, target's own)")
        ax.grid(alpha=0.3)
    left.set_xlabel(f"target layer (maps fit on {n_max} prompts)")
    left.set_title("off the mean stream")
    right.set_xlabel("prompts the maps are fit on")
    right.set_title("mean over layers (solid: whole, dashed: off the mean)")
    left.legend(fontsize=8)
    fig.tight_layout()
    path = out / "direction_agreement.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary(rows: list[dict]) -> str:
    lines = [
        "| rank | prompts fit | agreement, mean over layers | best layer | off the mean stream, mean "
        "| held-out error, mean |",
        "|---|---|---|---|---|---|",
    ]
    for rank in sorted({r["rank"] for r in rows}):
        for n in sorted({r["n_fit"] for r in rows}):
            mine = [r for r in rows if r["rank"] == rank and r["n_fit"] == n]
            best = max(mine, key=lambda r: r["agreement"])
            lines.append(
                f"| {rank} | {n} | {sum(r['agreement'] for r in mine) / len(mine):.3f} "
                f"| {best['target_layer']} ({best['agreement']:.3f}) "
                f"| {sum(r['agreement_off_mean'] for r in mine) / len(mine):.3f} "
                f"| {sum(r['heldout_error'] for r in mine) / len(mine):.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-extracted", type=Path, required=True)
    p.add_argument("--target-extracted", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    p.add_argument("--fit-sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--no-center", dest="center", action="store_false", help="fit without centring")
    args = p.parse_args()
    source, target = Extracted.load(args.source_extracted), Extracted.load(args.target_extracted)
    if source.questions != target.questions:
        raise SystemExit("the two extracted files were not made from the same prompts")
    rows = sweep(source, target, args.ranks, args.fit_sizes, args.holdout, args.center)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "source": source.metadata.get("source_locked"),
        "target": target.metadata.get("source_locked"),
        "n": len(source.questions),
        "center": args.center,
    }
    (args.out / "diagnose.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = summary(rows)
    (args.out / "diagnose.md").write_text(table + "\n")
    print(table)
    print("wrote", plot(rows, target.directions.shape[1], args.out))


if __name__ == "__main__":
    main()
