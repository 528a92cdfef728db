"""The capability artifact: one safetensors file with string metadata, validated on every load.

Tensors hold either the target directions (``directions`` [L, d_t], one row per steered layer) or the source
directions with each layer's low-rank factors (``source_directions`` [L, d_s], ``align.v_s`` [L, d_s, k],
``align.m`` [L, k, k], ``align.v_t`` [L, d_t, k]), from which r_t = v_s V_s M V_t^T is computed at load.
Files are written by our own serializer with sorted keys, so the same content always has the same sha256.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from unlock._version import __version__
from unlock.ops import OPERATORS, table_rows
from unlock.validation import DEFAULT_LIMITS, ArtifactError, Limits, check_limits, check_steering

FORMAT_TAG = "unlock.capability"
FORMAT_VERSION = 1
STORAGES = ("directions", "factors")

REQUIRED_KEYS = (
    "format", "format_version", "name", "mode", "default_strength", "layers", "storage",
    "target_architecture", "target_num_layers", "target_hidden_size", "target_name", "unlock_version",
)  # fmt: skip
# Written by `unlock build`/`align` when known; a loader accepts any subset of them.
OPTIONAL_KEYS = (
    "source_locked", "source_unlocked", "source_architecture", "source_num_layers", "source_hidden_size",
    "source_layers", "data", "field", "n", "n_fit", "n_holdout", "split_seed", "rank", "rank_requested",
    "aggregation", "center", "locked_template", "unlocked_template", "chat_template", "alignment_errors",
    "dtype", "alignment", "align_positions", "align_data", "align_field", "align_template", "align_n",
    "align_skip", "n_pairs", "ridge", "cv_folds", "error_kind", "layer_selection", "candidate_layers",
    "candidate_errors", "grid_errors", "positions", "row_norm", "combined_from", "combine_expression",
    "calibration", "source_locked_config_sha256", "source_unlocked_config_sha256", "target_config_sha256",
    "source_locked_path", "source_unlocked_path", "target_path",
)  # fmt: skip
FACTOR_TENSORS = ("source_directions", "align.v_s", "align.m", "align.v_t")


@dataclass(frozen=True)
class TargetInfo:
    """The identity of the model a capability steers."""

    architecture: str
    num_layers: int
    hidden_size: int
    name: str


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes, float32 little-endian, header keys sorted: same content, same bytes."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        array = tensors[name].detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4")
        chunk = array.tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(chunk)],
        }
        chunks.append(chunk)
        offset += len(chunk)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format aligns the data section to 8 bytes
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # A key given twice would be read one way here and possibly another by the safetensors parser.
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ArtifactError(f"not a capability file: the safetensors header repeats the keys {duplicates}")
    return dict(pairs)


def read_header_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ArtifactError(f"not a capability file: {len(data)} bytes, too short for a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if 8 + size > len(data):
        raise ArtifactError(
            f"truncated capability file: header says {size} bytes, the file has {len(data) - 8}"
        )
    try:
        header = json.loads(data[8 : 8 + size], object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        # RecursionError: a header of deeply nested brackets, which must be a 400 in the server, not a crash.
        raise ArtifactError("not a capability file: the safetensors header is not valid JSON") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ArtifactError("not a capability file: no string metadata in the safetensors header")
    return metadata


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place only once complete."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _int(metadata: dict[str, str], key: str, minimum: int = 1) -> int:
    try:
        value = int(metadata[key])
    except ValueError:
        raise ArtifactError(f"metadata {key!r} must be an integer, got {metadata[key]!r}") from None
    if value < minimum:
        raise ArtifactError(f"metadata {key!r} must be at least {minimum}, got {value}")
    return value


def _shape(tensors: dict[str, torch.Tensor], name: str, expected: tuple[int, ...]) -> None:
    if tuple(tensors[name].shape) != expected:
        raise ArtifactError(
            f"tensor {name!r} has shape {list(tensors[name].shape)} but the metadata implies {list(expected)}"
        )


class Capability:
    """A validated capability artifact.

    Build one with ``load``, ``from_bytes``, ``from_directions`` or ``from_factors``; every constructor goes
    through the file's bytes, so ``sha256`` is always that of the file ``save`` writes.
    """

    def __init__(self, data: bytes):
        self._data = bytes(data)
        self.sha256 = hashlib.sha256(self._data).hexdigest()
        self.metadata = read_header_metadata(self._data)
        self._check_metadata()
        try:
            self.tensors = load_safetensors(self._data)
        except SafetensorError as err:
            raise ArtifactError(f"corrupt or truncated capability file: {err}") from None
        self._directions = self._check_tensors()

    # -- constructors
    @classmethod
    def from_bytes(cls, data: bytes) -> Capability:
        return cls(data)

    @classmethod
    def load(cls, path: str | Path) -> Capability:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"capability file {str(path)!r} does not exist")
        try:
            return cls(path.read_bytes())
        except ArtifactError as err:
            raise ArtifactError(f"{path}: {err}") from None

    @classmethod
    def from_directions(
        cls,
        name: str,
        directions: torch.Tensor,
        layers: list[int],
        mode: str,
        default_strength: float,
        target: TargetInfo,
        metadata: dict[str, str] | None = None,
    ) -> Capability:
        """A capability that stores target directions [len(layers), hidden] directly."""
        meta = cls._base_metadata(name, layers, mode, default_strength, target, "directions", metadata)
        return cls(serialize({"directions": directions}, meta))

    @classmethod
    def from_factors(
        cls,
        name: str,
        source_directions: torch.Tensor,
        v_s: torch.Tensor,
        m: torch.Tensor,
        v_t: torch.Tensor,
        layers: list[int],
        mode: str,
        default_strength: float,
        target: TargetInfo,
        metadata: dict[str, str] | None = None,
    ) -> Capability:
        """A capability stored as source directions [L, d_s] and factors V_s [L, d_s, k], M [L, k, k],
        V_t [L, d_t, k], one slice per steered layer."""
        meta = cls._base_metadata(name, layers, mode, default_strength, target, "factors", metadata)
        tensors = dict(zip(FACTOR_TENSORS, (source_directions, v_s, m, v_t), strict=True))
        return cls(serialize(tensors, meta))

    @staticmethod
    def _base_metadata(name, layers, mode, default_strength, target, storage, extra) -> dict[str, str]:
        meta = {
            "format": FORMAT_TAG,
            "format_version": str(FORMAT_VERSION),
            "name": name,
            "mode": mode,
            "default_strength": repr(float(default_strength)),
            "layers": json.dumps([int(i) for i in layers]),
            "storage": storage,
            "target_architecture": target.architecture,
            "target_num_layers": str(int(target.num_layers)),
            "target_hidden_size": str(int(target.hidden_size)),
            "target_name": target.name,
            "unlock_version": __version__,
        }
        for key, value in (extra or {}).items():
            if key in meta:
                raise ArtifactError(
                    f"metadata key {key!r} is set from the arguments; do not pass it in metadata"
                )
            if not isinstance(value, str):
                raise ArtifactError(f"metadata {key!r} must be a string, got {type(value).__name__}")
            meta[key] = value
        return meta

    # -- validation
    def _check_metadata(self) -> None:
        meta = self.metadata
        if meta.get("format") != FORMAT_TAG:
            raise ArtifactError(
                f"not a capability file: format tag is {meta.get('format')!r}, not {FORMAT_TAG!r}"
            )
        version = meta.get("format_version", "")
        if version != str(FORMAT_VERSION):
            raise ArtifactError(
                f"unsupported format_version {version!r}: unlock {__version__} reads version "
                f"{FORMAT_VERSION}; rebuild the capability or upgrade unlock"
            )
        missing = [key for key in REQUIRED_KEYS if key not in meta]
        if missing:
            raise ArtifactError(f"capability metadata lacks required keys {missing}")
        unknown = sorted(set(meta) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
        if unknown:
            warnings.warn(
                f"capability {meta['name']!r}: ignoring unknown metadata keys {unknown}", stacklevel=3
            )
        if not meta["name"]:
            raise ArtifactError("capability name is empty")
        if meta["storage"] not in STORAGES:
            raise ArtifactError(f"unknown storage {meta['storage']!r}; expected one of {STORAGES}")
        try:
            strength = float(meta["default_strength"])
        except ValueError:
            strength = math.nan
        if not math.isfinite(strength):
            raise ArtifactError(f"default_strength must be a finite number, got {meta['default_strength']!r}")
        num_layers = _int(meta, "target_num_layers")
        _int(meta, "target_hidden_size")
        try:
            layers = json.loads(meta["layers"])
        except json.JSONDecodeError:
            layers = None
        if not isinstance(layers, list) or not layers or not all(type(i) is int for i in layers):
            raise ArtifactError(f"layers must be a non-empty JSON list of integers, got {meta['layers']!r}")
        if layers != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < num_layers:
            raise ArtifactError(
                f"layers {layers} must be sorted, distinct and within 0..{num_layers - 1} (target_num_layers)"
            )

    def _check_tensors(self) -> torch.Tensor:
        """Check names, shapes and values; return the target directions (float32 [L, hidden])."""
        expected = ("directions",) if self.storage == "directions" else FACTOR_TENSORS
        if sorted(self.tensors) != sorted(expected):
            raise ArtifactError(
                f"storage {self.storage!r} needs tensors {list(expected)}, "
                f"the file has {sorted(self.tensors)}"
            )
        for name, tensor in self.tensors.items():
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise ArtifactError(f"tensor {name!r} holds non-finite (NaN/Inf) or non-float values")
        count, hidden = len(self.layers), self.target_hidden_size
        if self.storage == "directions":
            _shape(self.tensors, "directions", (count, hidden))
            directions = self.tensors["directions"].float()
        else:
            src = self.tensors["source_directions"]
            if src.dim() != 2 or self.tensors["align.m"].dim() != 3:
                raise ArtifactError("source_directions must be 2-D and align.m 3-D")
            d_s, k = src.shape[1], self.tensors["align.m"].shape[-1]
            for name, shape in zip(
                FACTOR_TENSORS,
                ((count, d_s), (count, d_s, k), (count, k, k), (count, hidden, k)),
                strict=True,
            ):
                _shape(self.tensors, name, shape)
            directions = target_directions_from_factors(*(self.tensors[n] for n in FACTOR_TENSORS))
        meta = self.metadata
        check_steering(meta["mode"], meta.get("positions"), meta.get("row_norm"), self.layers, directions)
        return directions

    # -- accessors
    @property
    def name(self) -> str:
        return self.metadata["name"]

    @property
    def mode(self) -> str:
        return self.metadata["mode"]

    @property
    def positions(self) -> str:
        """Which tokens it edits unless a request says otherwise (`unlock.ops.POSITIONS`)."""
        return self.metadata.get("positions") or OPERATORS[self.mode].default_positions

    @property
    def row_norm(self) -> str:
        """`unit`: each layer's direction enters the operator normalised; `stored`: as stored."""
        return self.metadata.get("row_norm") or OPERATORS[self.mode].row_norms[0]

    @property
    def storage(self) -> str:
        return self.metadata["storage"]

    @property
    def layers(self) -> list[int]:
        return json.loads(self.metadata["layers"])

    @property
    def default_strength(self) -> float:
        return float(self.metadata["default_strength"])

    @property
    def target_num_layers(self) -> int:
        return int(self.metadata["target_num_layers"])

    @property
    def target_hidden_size(self) -> int:
        return int(self.metadata["target_hidden_size"])

    @property
    def target_name(self) -> str:
        return self.metadata["target_name"]

    @property
    def target_architecture(self) -> str:
        return self.metadata["target_architecture"]

    @property
    def alignment_errors(self) -> list[float] | None:
        """Held-out relative alignment error per steered layer, when the artifact records it."""
        raw = self.metadata.get("alignment_errors")
        return None if raw is None else [float(e) for e in json.loads(raw)]

    def target_directions(self) -> torch.Tensor:
        """float32 [len(layers), target_hidden_size], one row per steered target layer (a fresh copy)."""
        return self._directions.clone()

    def table_rows(self) -> torch.Tensor:
        """float32 [len(layers), hidden]: what the operator's tables hold for each steered layer."""
        return table_rows(self._directions, self.row_norm)

    def validate(
        self, num_layers: int | None = None, hidden_size: int | None = None, limits: Limits = DEFAULT_LIMITS
    ) -> None:
        """The one validator (`unlock.validation`): ArtifactError unless this capability fits the model
        (when its shape is given) and applies within `limits` with finite results."""
        if num_layers is not None and hidden_size is not None:
            self.check_target(num_layers, hidden_size)
        check_limits(self.name, self.default_strength, self.table_rows(), limits)

    def check_target(self, num_layers: int, hidden_size: int) -> None:
        """Raise ArtifactError unless the model has the layer count and hidden size this was built for."""
        if (num_layers, hidden_size) != (self.target_num_layers, self.target_hidden_size):
            raise ArtifactError(
                f"capability {self.name!r} was built for {self.target_name!r} "
                f"({self.target_num_layers} layers, "
                f"hidden size {self.target_hidden_size}), but the model has {num_layers} layers, hidden size "
                f"{hidden_size}; rebuild it with --target set to this model"
            )

    def with_default_strength(self, strength: float, calibration: str) -> Capability:
        """The same capability with a new default strength and how it was chosen (`unlock calibrate`)."""
        metadata = {**self.metadata, "default_strength": repr(float(strength)), "calibration": calibration}
        return Capability(serialize(self.tensors, metadata))

    def to_bytes(self) -> bytes:
        return self._data

    def save(self, path: str | Path) -> None:
        write_atomic(path, self._data)

    def __repr__(self) -> str:
        return (
            f"Capability(name={self.name!r}, mode={self.mode!r}, layers={self.layers}, "
            f"target={self.target_name!r}, sha256={self.sha256[:12]})"
        )


def target_directions_from_factors(
    source_directions: torch.Tensor, v_s: torch.Tensor, m: torch.Tensor, v_t: torch.Tensor
) -> torch.Tensor:
    """r_t = v_s V_s M V_t^T per layer, factor by factor in float64: [L, d_s] -> float32 [L, d_t]."""
    coords = torch.einsum("ld,ldk->lk", source_directions.double(), v_s.double())  # [L, k]
    coords = torch.einsum("lk,lkj->lj", coords, m.double())  # [L, k]
    return torch.einsum("lj,ldj->ld", coords, v_t.double()).float()  # [L, d_t]
