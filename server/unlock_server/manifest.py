"""The manifest: the registered capabilities, as one versioned document that every writer replaces whole.

Both coordination backends store this document (`coordination.py`: `manifest.json`; `postgres.py`: a row),
so it lives below both of them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

# `generation`, `updated_at` and `writer` were added within version 1: older manifests read as generation 0.
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ManifestEntry:
    """One registered capability as the server knows it (what the manifest stores and the API returns)."""

    name: str
    sha256: str
    mode: str
    layers: list[int]
    default_strength: float
    target: dict[str, Any]
    metadata: dict[str, str]
    size_bytes: int
    created_at: float = field(default_factory=time.time)

    def public(self) -> dict[str, Any]:
        return {"object": "capability", **asdict(self)}


@dataclass(frozen=True)
class Manifest:
    """One version of the manifest: its entries, and which writer made it when."""

    entries: dict[str, ManifestEntry]
    generation: int = 0
    updated_at: float = 0.0
    writer: str | None = None

    def references(self, sha256: str) -> bool:
        return any(e.sha256 == sha256 for e in self.entries.values())

    def document(self) -> dict[str, Any]:
        """The JSON form both backends store."""
        return {
            "version": MANIFEST_VERSION,
            "generation": self.generation,
            "updated_at": self.updated_at,
            "writer": self.writer,
            "capabilities": {name: asdict(e) for name, e in self.entries.items()},
        }

    @classmethod
    def from_document(cls, data: dict[str, Any], origin: str) -> Manifest:
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"{origin}: manifest version {data.get('version')!r} is not {MANIFEST_VERSION}; "
                "move it aside or point the server at another registry"
            )
        return cls(
            entries={name: ManifestEntry(**raw) for name, raw in data["capabilities"].items()},
            generation=int(data.get("generation", 0)),
            updated_at=float(data.get("updated_at", 0.0)),
            writer=data.get("writer"),
        )

    def successor(self, entries: dict[str, ManifestEntry], writer: str) -> Manifest:
        return Manifest(dict(sorted(entries.items())), self.generation + 1, time.time(), writer)
