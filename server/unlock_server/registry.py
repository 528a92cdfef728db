"""The capability registry: `blobs/<sha256>.safetensors` (content-addressed files) plus a manifest, safe with
several writers (replicas) sharing the blob directory.

- The manifest, the exclusion between writers, which writers are alive and their pins live in a
  `Coordination` (`coordination.py`): files next to the blobs by default, or a PostgreSQL database. Every
  manifest change is a read-modify-write inside its exclusion; nothing is cached here, so a writer never
  writes back a stale view. Each write bumps `generation`.
- Blob writes are atomic (temp file in the same directory, fsync, `os.replace`, fsync of the directory), and a
  blob is in place before any manifest names it, so a crash of any writer at any point leaves a valid registry
  (at worst files that `open` collects).
- Files in flight belong to their writer: uploads are `tmp/<owner>.<random>.upload`, and a blob placed but not
  yet published is pinned. Only files of writers that are gone are collected, and a blob is deleted only when
  no manifest entry names it and no live writer pins it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from .changes import ChangeListener
from .coordination import Coordination, FileCoordination, Transaction
from .errors import APIError
from .manifest import Manifest, ManifestEntry

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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
    """One writer's handle on a registry; `open` before use, `close` (or process exit) after."""

    def __init__(self, root: Path, coordination: Coordination | None = None):
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.coordination = coordination if coordination is not None else FileCoordination(root)
        self.owner = self.coordination.owner

    def open(self) -> Manifest:
        """Create the layout, mark this writer alive, collect what dead writers left; the manifest."""
        for path in (self.blobs, self.tmp):
            path.mkdir(parents=True, exist_ok=True)
        with self.coordination.locked() as tx:
            tx.join()
            self._collect(tx)
            return tx.read()

    def close(self) -> None:
        """This writer is gone: from here on its leftovers are anyone's to collect."""
        self.coordination.close()

    def read(self) -> Manifest:
        """The manifest now (no exclusion needed: it is only ever replaced whole); absent = empty."""
        return self.coordination.read()

    def listener(self) -> ChangeListener:
        """What tells this writer that another one changed the manifest (`changes.py`)."""
        return self.coordination.listener()

    def writers(self) -> set[str]:
        """The writers alive now (this one included once open)."""
        with self.coordination.locked() as tx:
            return tx.live_owners()

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
        with self.coordination.locked() as tx:
            tx.pin(staged.sha256)
            if blob.exists():
                staged.path.unlink(missing_ok=True)
            else:
                os.replace(staged.path, blob)
                _fsync_dir(self.blobs)
        return blob

    def publish(self, entry: ManifestEntry, replace: bool) -> tuple[Manifest, ManifestEntry | None]:
        """Name a placed blob in the manifest and unpin it. Returns the manifest after the change and the
        entry it replaced; 409 when the name took other content since the caller looked and `replace` is off.
        The same content already under the name leaves the manifest as it is."""
        with self.coordination.locked() as tx:
            current = tx.read()
            previous = current.entries.get(entry.name)
            if previous is not None and previous.sha256 != entry.sha256 and not replace:
                raise name_clash(entry.name, previous.sha256)
            tx.unpin(entry.sha256)  # first: the write below is what other replicas wait for, nothing after it
            if previous is None or previous.sha256 != entry.sha256:
                current = current.successor({**current.entries, entry.name: entry}, self.owner)
                tx.write(current)
            return current, previous

    def release(self, sha256: str) -> None:
        """Unpin a blob this writer placed but will not publish, and delete it unless it is in use."""
        with self.coordination.locked() as tx:
            tx.unpin(sha256)
            self._drop_if_unused(tx, sha256, tx.read(), tx.live_owners())

    def remove(self, name: str) -> tuple[Manifest, ManifestEntry | None]:
        """Drop `name` from the manifest and its blob unless another entry or a live writer still uses it
        (replicas that registered it keep their copy in memory). Returns the manifest and the removed one."""
        with self.coordination.locked() as tx:
            current = tx.read()
            entry = current.entries.get(name)
            if entry is not None:
                current = current.successor(
                    {k: v for k, v in current.entries.items() if k != name}, self.owner
                )
                tx.write(current)
                self._drop_if_unused(tx, entry.sha256, current, tx.live_owners())
            return current, entry

    def drop_blob(self, sha256: str) -> None:
        """Delete a blob (one a replace left behind) if no entry names it and no live writer pins it."""
        with self.coordination.locked() as tx:
            self._drop_if_unused(tx, sha256, tx.read(), tx.live_owners())

    def _collect(self, tx: Transaction) -> None:
        """Remove what dead writers left: their uploads and pins, and blobs nothing names or pins."""
        live = tx.live_owners()
        tx.collect(live)
        for path in self.tmp.iterdir():
            if path.name.split(".", 1)[0] not in live:
                logger.info("removing %s, left by a writer that is gone", path.name)
                path.unlink(missing_ok=True)
        manifest = tx.read()
        for blob in self.blobs.glob("*.safetensors"):
            self._drop_if_unused(tx, blob.stem, manifest, live)

    def _drop_if_unused(self, tx: Transaction, sha256: str, manifest: Manifest, live: set[str]) -> None:
        if manifest.references(sha256) or tx.pinned(sha256, live):
            return
        blob = self.blob_path(sha256)
        if blob.exists():
            logger.info("removing unreferenced capability blob %s", blob.name)
            blob.unlink(missing_ok=True)
