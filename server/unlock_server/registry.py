"""The on-disk capability registry: `blobs/<sha256>.safetensors` (content-addressed) plus `manifest.json`,
safe with several writers (replicas) on one shared directory.

- Every manifest change is a read-modify-write of the file on disk under `exclusive(.lock)`; nothing is
  cached here, so a writer never writes back a stale view. Each write bumps `generation`.
- Every write is atomic (temp file in the same directory, fsync, `os.replace`, fsync of the directory), and a
  blob is in place before any manifest names it, so a crash of any writer at any point leaves a valid registry
  (at worst files that `collect` removes).
- Files in flight belong to their writer: uploads are `tmp/<owner>.<random>.upload`, and a blob placed but not
  yet published is pinned by `tmp/<owner>.<sha256>.pin`. Only files of owners whose owner lock is free (the
  process is gone) are collected, and a blob is deleted only when no manifest entry names it and no live
  writer pins it.
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
from .locks import OwnerLock, exclusive, live_owners, new_owner_id

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# `generation`, `updated_at` and `writer` were added within version 1: older manifests read as generation 0.
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


def name_clash(name: str, existing_sha256: str) -> APIError:
    """The 409 for an upload whose name holds other content and that did not ask to replace it."""
    return APIError(
        409,
        f"capability {name!r} already exists with other content "
        f"(sha256 {existing_sha256[:12]}); add ?replace=true to replace it",
        param="name",
    )


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
class Manifest:
    """One version of `manifest.json`: its entries, and which writer made it when."""

    entries: dict[str, Entry]
    generation: int = 0
    updated_at: float = 0.0
    writer: str | None = None

    def references(self, sha256: str) -> bool:
        return any(e.sha256 == sha256 for e in self.entries.values())


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
    """One writer's handle on a registry directory; `open` before use, `close` (or process exit) after."""

    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.owners = root / "owners"
        self.manifest_path = root / "manifest.json"
        self.lock_path = root / ".lock"
        self.owner = new_owner_id()
        self._owner_lock = OwnerLock(self.owners, self.owner)

    def open(self) -> Manifest:
        """Create the layout, take this writer's owner lock, collect what dead writers left; the manifest."""
        for path in (self.blobs, self.tmp, self.owners):
            path.mkdir(parents=True, exist_ok=True)
        with exclusive(self.lock_path):
            self._owner_lock.acquire()
            self._collect()
            return self.read()

    def close(self) -> None:
        """Release the owner lock: from here on this writer's leftovers are anyone's to collect."""
        self._owner_lock.release()

    def read(self) -> Manifest:
        """The manifest on disk now (no lock needed: it is only ever replaced whole); absent = empty."""
        try:
            data = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return Manifest({})
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"{self.manifest_path}: manifest version {data.get('version')!r} is not "
                f"{MANIFEST_VERSION}; move the directory aside or point --capabilities-dir elsewhere"
            )
        return Manifest(
            entries={name: Entry(**raw) for name, raw in data["capabilities"].items()},
            generation=int(data.get("generation", 0)),
            updated_at=float(data.get("updated_at", 0.0)),
            writer=data.get("writer"),
        )

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / f"{sha256}.safetensors"

    async def stage(self, chunks: AsyncIterator[bytes], max_bytes: int) -> Staged:
        """Stream an upload into a temp file, hashing as it goes; 413 as soon as it passes `max_bytes`."""
        digest = hashlib.sha256()
        size = 0
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix=f"{self.owner}.", suffix=".upload")
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
        """Move a staged upload to its content address (or reuse the blob already there) and pin it until
        `publish` or `release`, so no other writer deletes it while this one registers it."""
        blob = self.blob_path(staged.sha256)
        with exclusive(self.lock_path):
            self._pin_path(staged.sha256).touch()
            if blob.exists():
                staged.path.unlink(missing_ok=True)
            else:
                os.replace(staged.path, blob)
                _fsync_dir(self.blobs)
        return blob

    def publish(self, entry: Entry, replace: bool) -> tuple[Manifest, Entry | None]:
        """Name a placed blob in the manifest and unpin it. Returns the manifest after the change and the
        entry it replaced; 409 when the name took other content since the caller looked and `replace` is off.
        The same content already under the name leaves the manifest as it is."""
        with exclusive(self.lock_path):
            current = self.read()
            previous = current.entries.get(entry.name)
            if previous is not None and previous.sha256 != entry.sha256 and not replace:
                raise name_clash(entry.name, previous.sha256)
            if previous is None or previous.sha256 != entry.sha256:
                current = self._write_manifest({**current.entries, entry.name: entry}, current.generation)
            self._pin_path(entry.sha256).unlink(missing_ok=True)
            return current, previous

    def release(self, sha256: str) -> None:
        """Unpin a blob this writer placed but will not publish, and delete it unless it is in use."""
        with exclusive(self.lock_path):
            self._pin_path(sha256).unlink(missing_ok=True)
            self._drop_if_unused(sha256, self.read(), live_owners(self.owners))

    def remove(self, name: str) -> tuple[Manifest, Entry | None]:
        """Drop `name` from the manifest and its blob unless another entry or a live writer still uses it
        (replicas that registered it keep their copy in memory). Returns the manifest and the removed one."""
        with exclusive(self.lock_path):
            current = self.read()
            entry = current.entries.get(name)
            if entry is not None:
                rest = {k: v for k, v in current.entries.items() if k != name}
                current = self._write_manifest(rest, current.generation)
                self._drop_if_unused(entry.sha256, current, live_owners(self.owners))
            return current, entry

    def drop_blob(self, sha256: str) -> None:
        """Delete a blob (one a replace left behind) if no entry names it and no live writer pins it."""
        with exclusive(self.lock_path):
            self._drop_if_unused(sha256, self.read(), live_owners(self.owners))

    def _collect(self) -> None:
        """Remove what dead writers left: their uploads and pins, manifest temp files (written only under the
        lock we hold, so any one is a crashed writer's), and blobs nothing names or pins."""
        live = live_owners(self.owners)
        for path in self.tmp.iterdir():
            if path.name.split(".", 1)[0] not in live:
                logger.info("removing %s, left by a writer that is gone", path.name)
                path.unlink(missing_ok=True)
        for path in self.root.glob(".manifest.*.json"):
            path.unlink(missing_ok=True)
        manifest = self.read()
        for blob in self.blobs.glob("*.safetensors"):
            self._drop_if_unused(blob.stem, manifest, live)

    def _pin_path(self, sha256: str) -> Path:
        return self.tmp / f"{self.owner}.{sha256}.pin"

    def _drop_if_unused(self, sha256: str, manifest: Manifest, live: set[str]) -> None:
        if manifest.references(sha256):
            return
        if any(pin.name.split(".", 1)[0] in live for pin in self.tmp.glob(f"*.{sha256}.pin")):
            return
        blob = self.blob_path(sha256)
        if blob.exists():
            logger.info("removing unreferenced capability blob %s", blob.name)
            blob.unlink(missing_ok=True)

    def _write_manifest(self, entries: dict[str, Entry], generation: int) -> Manifest:
        """Replace the manifest atomically; the caller holds the lock and read `generation` under it."""
        manifest = Manifest(dict(sorted(entries.items())), generation + 1, time.time(), self.owner)
        data = {
            "version": MANIFEST_VERSION,
            "generation": manifest.generation,
            "updated_at": manifest.updated_at,
            "writer": manifest.writer,
            "capabilities": {name: asdict(e) for name, e in manifest.entries.items()},
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
        return manifest
