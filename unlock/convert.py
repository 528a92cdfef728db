"""Convert a GGUF file into an ordinary Hugging Face folder (safetensors + tokenizer + config).

The real models this project can reach offline ship as quantized GGUF files (see ASSETS.md). transformers
dequantizes a GGUF on load; saving the result once gives a folder that vLLM, transformers and `unlock`
all read the same way, without the `gguf` package or a slow dequantization at every start.

The write is atomic (a temporary sibling directory renamed into place) and idempotent: a folder that already
holds a finished conversion of the same file is returned as is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Written last into a finished folder; with a matching source it is what "already converted" means.
MARKER = "unlock_convert.json"


def convert_gguf(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> Path:
    """Convert `gguf_path` into an HF folder at `out_dir` and return `out_dir`.

    Weights are saved in `dtype` (float32 by default: the quantized values dequantize exactly into it).
    Skips the work when `out_dir` already holds a conversion of the same file (name, size) in the same dtype;
    refuses to overwrite a folder that holds anything else.
    """
    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(
            f"GGUF file {gguf_path} does not exist; fetch it first (bench/fetch_assets.py)"
        )
    source = {"gguf_file": gguf_path.name, "gguf_size": gguf_path.stat().st_size, "dtype": str(dtype)}
    if out_dir.exists():
        if _finished_conversion_of(out_dir) == source:
            return out_dir
        raise FileExistsError(
            f"{out_dir} exists but is not a finished conversion of {gguf_path.name} in {dtype}; "
            "remove it or choose another out_dir"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling temp dir, so the final rename stays on one filesystem and is atomic.
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _convert_into(gguf_path, tmp_dir, dtype)
        (tmp_dir / MARKER).write_text(json.dumps(source, indent=2) + "\n")
        _make_readable(tmp_dir)
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _make_readable(directory: Path) -> None:
    # mkdtemp (and safetensors) create owner-only entries; a model folder is shared with servers and users.
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _finished_conversion_of(out_dir: Path) -> dict | None:
    marker = out_dir / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def _convert_into(gguf_path: Path, dest: Path, dtype: torch.dtype) -> None:
    # Imported here: transformers is slow to import and only this path needs it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=dtype, **_dense_load_kwargs()
    )
    # Newer transformers attach a GGUF quantizer that refuses to save; the weights are dense now: drop it.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    _write_both_rope_keys(dest / "config.json")


def _dense_load_kwargs() -> dict:
    """Ask for every weight unpacked into a plain tensor: a folder of packed GGUF blocks is no use to vLLM."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers before GgufConfig always dequantized a GGUF on load
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _write_both_rope_keys(config_path: Path) -> None:
    """Give the config both `rope_parameters` (transformers 5) and `rope_theta` (older readers, fallbacks).

    transformers 5 writes only `rope_parameters`; a reader that looks for `rope_theta` would silently use its
    own default base and compute wrong positions. Writing both keeps every reader on the GGUF's value.
    """
    config = json.loads(config_path.read_text())
    params = config.get("rope_parameters")
    theta = config.get("rope_theta")
    if params is None and theta is None:
        raise ValueError(
            f"{config_path} has neither rope_parameters nor rope_theta; cannot pin the RoPE base"
        )
    if params is None:
        params = {"rope_type": "default", "rope_theta": theta}
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", theta)
    if theta is not None and params["rope_theta"] != theta:
        raise ValueError(f"{config_path}: rope_theta {theta} disagrees with rope_parameters {params}")
    config["rope_parameters"] = params
    config["rope_theta"] = params["rope_theta"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
