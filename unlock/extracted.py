"""The file `unlock extract` writes and `unlock align` reads: a direction per source layer, with the source
activations and settings that alignment reuses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from unlock.artifacts import read_header_metadata, serialize, write_atomic
from unlock.identity import without_paths

EXTRACTED_TAG = "unlock.extracted"  # the `format` of its header metadata
EXTRACTED_VERSION = "1"


@dataclass
class Extracted:
    """Step 2's output: a direction per source layer, plus what alignment needs to reuse the same prompts."""

    directions: torch.Tensor  # [n_s, d_s]
    locked_acts: torch.Tensor  # [N, n_s, d_s], source-locked activations
    metadata: dict[str, str]  # includes the questions and the locked template text
    # [N, n_s, d_s], source-unlocked activations: kept for research (split-half reliability of the direction);
    # None in files written before they were saved
    unlocked_acts: torch.Tensor | None = None

    @property
    def questions(self) -> list[str]:
        return json.loads(self.metadata["questions"])

    def save(self, path: str | Path, record_paths: bool = False) -> None:
        """Write the file; the source models' folders only if `record_paths` (their names identify them)."""
        tensors = {"directions": self.directions, "locked_activations": self.locked_acts}
        if self.unlocked_acts is not None:
            tensors["unlocked_activations"] = self.unlocked_acts
        metadata = self.metadata if record_paths else without_paths(self.metadata)
        write_atomic(path, serialize(tensors, metadata))

    @classmethod
    def load(cls, path: str | Path) -> Extracted:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"extracted file {str(path)!r} does not exist; write one with `unlock extract`")
        data = path.read_bytes()
        try:
            meta = read_header_metadata(data)
            tensors = load_safetensors(data)
        except (ValueError, SafetensorError) as err:
            raise ValueError(f"{path}: not a readable `unlock extract` file: {err}") from None
        if meta.get("format") != EXTRACTED_TAG or meta.get("format_version") != EXTRACTED_VERSION:
            raise ValueError(
                f"{path}: format {meta.get('format')!r} v{meta.get('format_version')}, "
                f"expected {EXTRACTED_TAG!r} v{EXTRACTED_VERSION}; write it with `unlock extract`"
            )
        directions, acts = tensors.get("directions"), tensors.get("locked_activations")
        n = len(json.loads(meta["questions"]))
        if directions is None or acts is None or acts.shape[0] != n or acts.shape[1:] != directions.shape:
            raise ValueError(f"{path}: tensors disagree with each other or with its {n} questions")
        unlocked = tensors.get("unlocked_activations")
        if unlocked is not None and unlocked.shape != acts.shape:
            raise ValueError(f"{path}: its unlocked activations do not have the shape of its locked ones")
        if not all(torch.isfinite(x).all() for x in (directions, acts, unlocked) if x is not None):
            raise ValueError(f"{path}: holds non-finite values")
        return cls(directions, acts, meta, unlocked)
