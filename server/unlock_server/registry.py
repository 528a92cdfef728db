"""The on-disk capability registry: `blobs/<sha256>.safetensors` (content-addressed) plus `manifest.json`.

Every write is atomic (temp file in the same directory, fsync, `os.replace`, fsync of the directory), and
the manifest is written only after its blob is in place, so a crash at any point leaves the registry as it
was before (at worst an orphan blob, removed by `sweep`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import APIError

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MANIFEST_VERSION = 1


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name) or ".." in name:
        raise APIError(
            400,
            f"invalid capability name {name!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit, without '..'",
            param="name",
        )
    return name


@dataclass(frozen=True)
class Entry:
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
class Staged:
    """An uploaded body written to a temp file inside the registry, not yet part of it."""

    path: Path
    sha256: str
    size_bytes: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Registry:
    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.manifest_path = root / "manifest.json"
        self._entries: dict[str, Entry] = {}

    def load(self) -> list[Entry]:
        """Read the manifest (an absent one is an empty registry) and clear stale uploads."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp.iterdir():
            stale.unlink(missing_ok=True)
        if self.manifest_path.exists():
            data = json.loads(self.manifest_path.read_text())
            if data.get("version") != MANIFEST_VERSION:
                raise ValueError(
                    f"{self.manifest_path}: manifest version {data.get('version')!r} is not "
                    f"{MANIFEST_VERSION}; move the directory aside or point --capabilities-dir elsewhere"
                )
            self._entries = {name: Entry(**raw) for name, raw in data["capabilities"].items()}
        self.sweep()
        return self.entries()

    def entries(self) -> list[Entry]:
        return sorted(self._entries.values(), key=lambda e: e.name)

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / f"{sha256}.safetensors"

    def is_referenced(self, sha256: str) -> bool:
        return any(e.sha256 == sha256 for e in self._entries.values())

    async def stage(self, chunks: AsyncIterator[bytes], max_bytes: int) -> Staged:
        """Stream an upload into a temp file, hashing as it goes; 413 as soon as it passes `max_bytes`."""
        digest = hashlib.sha256()
        size = 0
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".upload")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise APIError(
                            413,
                            f"capability upload exceeds the limit of {max_bytes} bytes; "
                            "raise --max-upload-bytes if this artifact is genuine",
                        )
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Staged(path, digest.hexdigest(), size)

    def place(self, staged: Staged) -> Path:
        """Move a staged upload to its content address (a no-op when that blob already exists)."""
        blob = self.blob_path(staged.sha256)
        if blob.exists():
            staged.path.unlink(missing_ok=True)
        else:
            os.replace(staged.path, blob)
            _fsync_dir(self.blobs)
        return blob

    def publish(self, entry: Entry) -> None:
        """Name a placed blob in the manifest (replacing any entry of the same name)."""
        entries = dict(self._entries)
        entries[entry.name] = entry
        self._write_manifest(entries)

    def remove(self, name: str) -> Entry | None:
        """Drop `name` from the manifest; its blob stays until `drop_blob` (requests may still use it)."""
        entry = self._entries.get(name)
        if entry is not None:
            entries = dict(self._entries)
            del entries[name]
            self._write_manifest(entries)
        return entry

    def drop_blob(self, sha256: str) -> None:
        if not self.is_referenced(sha256):
            self.blob_path(sha256).unlink(missing_ok=True)

    def sweep(self) -> None:
        """Delete blobs no manifest entry names (left by a crash between blob and manifest writes)."""
        for blob in self.blobs.glob("*.safetensors"):
            if not self.is_referenced(blob.stem):
                logger.info("removing unreferenced capability blob %s", blob.name)
                blob.unlink(missing_ok=True)

    def _write_manifest(self, entries: dict[str, Entry]) -> None:
        data = {
            "version": MANIFEST_VERSION,
            "capabilities": {name: asdict(e) for name, e in sorted(entries.items())},
        }
        fd, name = tempfile.mkstemp(dir=self.root, prefix=".manifest.", suffix=".json")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(data, out, indent=2)
                out.flush()
                os.fsync(out.fileno())
            os.replace(name, self.manifest_path)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)
        self._entries = entries
