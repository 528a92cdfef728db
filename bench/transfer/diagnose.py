"""Does the alignment carry the direction? A check that needs no generation (a research instrument: the method
itself never sees the target's own direction).

`unlock extract` run on the source and on the target with the same prompts and templates gives both models'
own cot-minus-direct directions. The maps are fit as `unlock align` fits them (`unlock.align`), on one of two
kinds of rows:
- the extraction prompts' last tokens (the default: the `locked_activations` of the two extracted files);
- an alignment corpus captured by `unlock capture` into --capture-dir, at the last token and/or at every
  token pair (--positions last all; pairs as `unlock align --align-positions all` makes them).
Applied to the source direction, a map should land near the target's own direction if the method's premise
holds. Reported per target layer, for every positions x texts x rank x ridge:

- agreement: cosine between the mapped source direction and the target's own direction (a random direction
  in the target's space scores about 1/sqrt(d_t));
- agreement off the mean: the same after removing from both the component along the target's mean locked
  activation at that layer (rotation moves the stream only by the part of r orthogonal to the stream);
- ceiling: the share of the target's own direction (off the mean) inside the span of V_t, |V_t^T r| / |r|:
  no k x k map into that subspace can agree better;
- cv error: the k-fold cross-validated relative map error over whole texts (what `unlock align` stores). It
  needs no labels, so the table also names the configuration it would choose.

  .venv/bin/python bench/transfer/diagnose.py \\
      --source-extracted bench/cache/extracted/qwen15-math64.safetensors \\
      --target-extracted bench/cache/extracted/qwen05-math64.safetensors \\
      --capture-dir bench/cache/streams --align-data bench/cache/data/align_math.jsonl \\
      --positions last all --texts 64 256 --ranks 16 64 256 --ridges 0 0.01 0.1 --out DIR
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
from tqdm.auto import tqdm  # noqa: E402

from unlock.align import FitSettings, depth_map, fit_decomposed, layer_fits  # noqa: E402
from unlock.data import load_questions  # noqa: E402
from unlock.extracted import Extracted  # noqa: E402
from unlock.pairing import corpus_pairs  # noqa: E402
from unlock.rows import flat_rows  # noqa: E402
from unlock.streams import load_layer, open_store, store_dir_of  # noqa: E402
from unlock.templates import load_template, render  # noqa: E402

cos = torch.nn.functional.cosine_similarity


class Rows:
    """Each layer's rows of the two models, with the (source row, target row, text) triples of each positions
    mode: from the stores of an alignment corpus, or from the extracted files' last tokens."""

    def __init__(self, source: Extracted, target: Extracted, args: argparse.Namespace):
        self.source, self.target = source, target
        if args.capture_dir is None:
            if source.questions != target.questions:
                raise SystemExit("the two extracted files were not made from the same prompts")
            self.n_texts, self.chunks = len(source.questions), None
            index = torch.arange(self.n_texts)
            self.triples = {"last": (index, index, index)}
            return
        template = load_template(args.align_template)
        texts = load_questions(args.align_data, args.align_field, max(args.texts))
        prompts = [render(template, q) for q in texts]
        self.n_texts, self.chunks = len(prompts), []
        for extracted in (source, target):
            meta = extracted.metadata
            directory = store_dir_of(
                args.capture_dir, meta["source_locked"], f"torch.{meta['dtype']}", False,
                int(meta["source_num_layers"]), int(meta["source_hidden_size"]),
            )  # fmt: skip
            self.chunks.append(open_store(directory, prompts))
        ends_s, ends_t = ([e for c in chunks for e in c.ends] for chunks in self.chunks)
        lengths = [len(e) for e in ends_s], [len(e) for e in ends_t]
        last = [[(len(a) - 1, len(b) - 1)] for a, b in zip(ends_s, ends_t, strict=True)]
        self.triples = {}
        for mode in args.positions:
            pairs = last if mode == "last" else corpus_pairs(prompts, ends_s, ends_t, args.skip)
            self.triples[mode] = flat_rows(pairs, *lengths)

    def layer(self, s: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row of source layer s and target layer t: [rows, d_s], [rows, d_t]."""
        if self.chunks is None:
            return self.source.locked_acts[:, s], self.target.locked_acts[:, t]
        return load_layer(self.chunks[0], s), load_layer(self.chunks[1], t)


def off_axis(v: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """v less its component along the unit vector ``axis``."""
    return v - (v @ axis) * axis


def sweep(rows: Rows, args: argparse.Namespace) -> list[dict]:
    """One row per (positions, texts, rank, ridge, target layer)."""
    source, target = rows.source, rows.target
    n_s, n_t = source.directions.shape[0], target.directions.shape[0]
    means = torch.nn.functional.normalize(target.locked_acts.double().mean(0), dim=-1)  # [n_t, d_t]
    sizes = sorted({min(n, rows.n_texts) for n in args.texts})
    settings = FitSettings(tuple(args.ranks), args.center, tuple(args.ridges), folds=args.folds)
    out = []
    for t in tqdm(range(n_t), desc="target layers", unit="layer"):
        s = depth_map(t, n_s, n_t)
        x_s_all, x_t_all = rows.layer(s, t)
        axis = means[t]
        own_off = off_axis(target.directions[t].double(), axis)
        for mode, (src_rows, tgt_rows, groups) in rows.triples.items():
            for n in sizes:
                keep = groups < n
                x_s, x_t = x_s_all[src_rows[keep]], x_t_all[tgt_rows[keep]]
                fits = layer_fits(x_s, x_t, groups[keep], n, settings)  # what `unlock align` computes
                for rank, ridge in settings.grid():
                    layer_map = fit_decomposed(fits.full, rank, ridge)
                    mapped = layer_map.apply(source.directions[s])
                    out.append({
                        "positions": mode, "texts": n, "pairs": fits.n_rows, "rank": layer_map.m.shape[0],
                        "rank_asked": rank, "ridge": ridge, "target_layer": t, "source_layer": s,
                        "agreement": float(cos(mapped, target.directions[t].double(), dim=0)),
                        "agreement_off_mean": float(cos(off_axis(mapped, axis), own_off, dim=0)),
                        "ceiling": float((layer_map.v_t.T @ own_off).norm() / own_off.norm()),
                        "cv_error": fits.errors[(rank, ridge)],
                    })  # fmt: skip
    return out


def configs(rows: list[dict]) -> list[tuple]:
    return sorted({(r["positions"], r["texts"], r["rank_asked"], r["ridge"]) for r in rows})


def of(rows: list[dict], config: tuple) -> list[dict]:
    return [r for r in rows if (r["positions"], r["texts"], r["rank_asked"], r["ridge"]) == config]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def rank_label(row: dict) -> str:
    """k used, and the rank asked when fewer rows capped it."""
    asked = row["rank_asked"]
    return str(row["rank"]) if row["rank"] == asked else f"{row['rank']} (asked {asked})"


def summary(rows: list[dict], n_t: int) -> str:
    later = n_t // 2
    lines = [
        "| positions | texts | pairs | rank | ridge | agreement | off the mean | off the mean, layers "
        f">= {later} | ceiling | cv error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in configs(rows):
        mine = of(rows, config)
        lines.append(
            f"| {config[0]} | {config[1]} | {mine[0]['pairs']} | {rank_label(mine[0])} | {config[3]:g} "
            f"| {mean([r['agreement'] for r in mine]):.3f} "
            f"| {mean([r['agreement_off_mean'] for r in mine]):.3f} "
            f"| {mean([r['agreement_off_mean'] for r in mine if r['target_layer'] >= later]):.3f} "
            f"| {mean([r['ceiling'] for r in mine]):.3f} | {mean([r['cv_error'] for r in mine]):.3f} |"
        )
    lines += ["", "Chosen without labels (lowest mean cv error), per positions mode and number of texts:", ""]
    for mode, n in sorted({(c[0], c[1]) for c in configs(rows)}):
        best = min((c for c in configs(rows) if c[:2] == (mode, n)), key=lambda c: mean(
            [r["cv_error"] for r in of(rows, c)]))  # fmt: skip
        mine = of(rows, best)
        lines.append(
            f"- {mode}, {n} texts: rank {best[2]}, ridge {best[3]:g}; off the mean "
            f"{mean([r['agreement_off_mean'] for r in mine]):.3f} (layers >= {later}: "
            f"{mean([r['agreement_off_mean'] for r in mine if r['target_layer'] >= later]):.3f}); per layer "
            + " ".join(f"{r['agreement_off_mean']:+.2f}" for r in mine)
        )
    return "\n".join(lines)


def plot(rows: list[dict], d_t: int, out: Path) -> Path:
    """Per layer, off the mean stream: the configuration of lowest cv error of each positions mode and number
    of texts (solid), and its ceiling (dotted)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for mode, n in sorted({(c[0], c[1]) for c in configs(rows)}):
        best = min((c for c in configs(rows) if c[:2] == (mode, n)), key=lambda c: mean(
            [r["cv_error"] for r in of(rows, c)]))  # fmt: skip
        mine = of(rows, best)
        layers = [r["target_layer"] for r in mine]
        label = f"{mode}, {n} texts, rank {mine[0]['rank']}, ridge {best[3]:g}"
        line = ax.plot(layers, [r["agreement_off_mean"] for r in mine], marker=".", label=label)[0]
        ax.plot(layers, [r["ceiling"] for r in mine], ":", color=line.get_color())
    ax.axhline(1 / math.sqrt(d_t), color="grey", linestyle="--", label="random direction")
    ax.set_xlabel("target layer")
    ax.set_ylabel("cosine with the target's own direction, off the mean")
    ax.set_title("mapped source direction (solid) and subspace ceiling (dotted); lowest cv error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "direction_agreement.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-extracted", type=Path, required=True)
    p.add_argument("--target-extracted", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--capture-dir", type=Path, help="`unlock capture` stores of both models (default: none)")
    p.add_argument("--align-data", type=Path, help="the corpus the stores were captured on")
    p.add_argument("--align-field", default="question")
    p.add_argument("--align-template", default="direct")
    p.add_argument("--positions", nargs="+", choices=("last", "all"), default=["last", "all"])
    p.add_argument("--skip", type=int, default=2, help="first positions left out of token pairs")
    p.add_argument("--texts", type=int, nargs="+", default=[64], help="numbers of alignment texts")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--ridges", type=float, nargs="+", default=[0.0, 0.01, 0.1])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--no-center", dest="center", action="store_false", help="fit without centring")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a 2-core machine shared with another job, LAPACK's eigensolver "
        "ran 50x slower with 2 threads than with 1)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if (args.capture_dir is None) != (args.align_data is None):
        raise SystemExit("--capture-dir and --align-data go together")
    if args.capture_dir is None:
        args.positions = ["last"]
    source, target = Extracted.load(args.source_extracted), Extracted.load(args.target_extracted)
    rows = sweep(Rows(source, target, args), args)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "source": source.metadata.get("source_locked"),
        "target": target.metadata.get("source_locked"),
        "rows": "extraction prompts" if args.capture_dir is None else str(args.align_data.name),
        "center": args.center,
        "folds": args.folds,
        "skip": args.skip,
    }
    (args.out / "diagnose.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = summary(rows, target.directions.shape[0])
    (args.out / "diagnose.md").write_text(table + "\n")
    print(table)
    print("wrote", plot(rows, target.directions.shape[1], args.out))


if __name__ == "__main__":
    main()
