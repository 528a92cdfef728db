"""Hostile capability uploads, each built from a valid artifact for the tiny target (4 layers, hidden 64).

Every case is something a buggy tool or an attacker could send; each must be refused with a 4xx that names
the problem, and none may leave a trace in the registry.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from serve_harness import capability_bytes

# Twice the upload limit the hardening servers run with (`UPLOAD_LIMIT`): refused with 413 while streaming.
GIANT_METADATA_BYTES = 2 << 20


@dataclass(frozen=True)
class Hostile:
    id: str
    body: bytes
    status: int  # the exact 4xx expected
    fragment: str  # a piece of the error message that names the problem
    params: dict[str, str] = field(default_factory=dict)


def split(data: bytes) -> tuple[dict, bytes]:
    """(header dict, data section) of a safetensors file."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def join(header: dict | bytes, payload: bytes) -> bytes:
    """A safetensors file from a header (dict, or raw bytes for malformed JSON) and a data section."""
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + payload


def edit_metadata(data: bytes, **changes: str) -> bytes:
    header, payload = split(data)
    header["__metadata__"].update(changes)
    return join(header, payload)


def edit_tensor(data: bytes, **changes) -> bytes:
    header, payload = split(data)
    header["directions"].update(changes)
    return join(header, payload)


def corpus() -> list[Hostile]:
    good = capability_bytes("hostile", seed=5)
    bad_name = "invalid capability name"
    header, payload = split(good)
    renamed = dict(header)
    renamed["other"] = renamed.pop("directions")
    duplicate_key = json.dumps(header, separators=(",", ":")).encode()
    duplicate_key = duplicate_key[:-1] + b',"directions":' + json.dumps(header["directions"]).encode() + b"}"
    extra = {**header["directions"], "data_offsets": [len(payload), 2 * len(payload)]}
    inf = payload[:-4] + struct.pack("<f", float("inf"))
    nan_first = struct.pack("<f", float("nan")) + payload[4:]
    return [
        Hostile("empty-body", b"", 400, "too short"),
        Hostile("not-safetensors", b"GIF89a this is an image, not a capability\n" * 4, 400, "capability"),
        Hostile("json-body", json.dumps({"name": "x"}).encode(), 400, "capability"),
        Hostile("truncated-header", good[:40], 400, "truncated"),
        Hostile("truncated-data", good[: len(good) - 100], 400, "truncated"),
        Hostile("huge-header-length", (1 << 62).to_bytes(8, "little") + good[8:], 400, "truncated"),
        Hostile("huge-data-offsets", edit_tensor(good, data_offsets=[0, 1 << 40]), 400, "capability"),
        Hostile("huge-shape", edit_tensor(good, shape=[1 << 20, 1 << 20]), 400, "capability"),
        Hostile("negative-offsets", edit_tensor(good, data_offsets=[-8, len(payload)]), 400, "capability"),
        Hostile("wrong-dtype-i32", edit_tensor(good, dtype="I32"), 400, "non-float"),
        Hostile("wrong-dtype-f16", edit_tensor(good, dtype="F16", shape=[4, 128]), 400, "non-float"),
        Hostile("unknown-dtype", edit_tensor(good, dtype="Q4"), 400, "capability"),
        Hostile("nan", payload and join(header, nan_first), 400, "finite"),
        Hostile("inf", join(header, inf), 400, "finite"),
        Hostile("all-zero-direction", join(header, b"\0" * len(payload)), 400, "zero"),
        Hostile("duplicate-tensor", join(duplicate_key, payload), 400, "capability"),
        Hostile("missing-tensor", join({"__metadata__": header["__metadata__"]}, b""), 400, "directions"),
        Hostile("renamed-tensor", join(renamed, payload), 400, "directions"),
        Hostile("extra-tensor", join({**header, "extra": extra}, payload + payload), 400, "extra"),
        Hostile("layers-lie", edit_metadata(good, layers="[0, 1]"), 400, "shape"),
        Hostile("hidden-lies", edit_metadata(good, target_hidden_size="32"), 400, "shape"),
        Hostile("layer-out-of-range", edit_metadata(good, layers="[0, 1, 2, 9]"), 400, "layer"),
        Hostile("num-layers-lie", edit_metadata(good, target_num_layers="40"), 400, "layers"),
        Hostile("strength-nan", edit_metadata(good, default_strength="nan"), 400, "strength"),
        Hostile("mode-unknown", edit_metadata(good, mode="explode"), 400, "mode"),
        Hostile("format-wrong", edit_metadata(good, format="pickle"), 400, "format"),
        Hostile("version-future", edit_metadata(good, format_version="99"), 400, "version"),
        Hostile(
            "metadata-not-strings", join({**header, "__metadata__": {"name": 1}}, payload), 400, "metadata"
        ),
        Hostile("name-traversal", edit_metadata(good, name="../../outside"), 400, bad_name),
        Hostile("name-absolute", edit_metadata(good, name="/tmp/outside"), 400, bad_name),
        Hostile("name-backslash", edit_metadata(good, name="a\\..\\b"), 400, bad_name),
        Hostile("name-slash", edit_metadata(good, name="blobs/x"), 400, bad_name),
        Hostile("name-unicode", edit_metadata(good, name="ｃｏｔ\u202e"), 400, bad_name),
        Hostile("name-control", edit_metadata(good, name="cot\x00\n\x1b[31m"), 400, bad_name),
        Hostile("name-empty", edit_metadata(good, name=""), 400, "name"),
        Hostile("name-long", edit_metadata(good, name="a" * 300), 400, bad_name),
        Hostile("query-name-traversal", good, 400, bad_name, {"name": "../manifest.json"}),
        Hostile("query-name-dotdot", good, 400, bad_name, {"name": "x..y"}),
        Hostile("query-name-control", good, 400, bad_name, {"name": "a\tb\r\nc"}),
        Hostile("query-name-unicode", good, 400, bad_name, {"name": "ünïcødé"}),
        Hostile(
            "giant-metadata", edit_metadata(good, notes="x" * GIANT_METADATA_BYTES), 413, "exceeds the limit"
        ),
        Hostile("header-not-json", join(b"\xff\xfe{not json", payload), 400, "JSON"),
        Hostile("header-json-list", join(b"[1, 2, 3]", payload), 400, "metadata"),
        Hostile("header-deep-nesting", join(b"[" * 100_000 + b"]" * 100_000, payload), 400, "capability"),
    ]
