"""Where the registry's shared state lives: the manifest (`manifest.py`), the live writers, and their pins.

The blobs are always content-addressed files (`registry.py`); what several writers must agree on goes through
a `Coordination`:
- `FileCoordination` (the default): `manifest.json` in the registry directory, `flock` for exclusion and for
  each writer's liveness (`locks.py`), pins as files in `tmp/`. Needs a filesystem whose locks exclude across
  every host that mounts it (docs/server.md).
- `PostgresCoordination` (`postgres.py`): the same state in a PostgreSQL database, for shared filesystems
  whose locks are not reliable.

Every change runs inside `locked()`, whose transaction reads the manifest as it is now, never a cached view.
Each backend also offers a `listener()` that hears other writers' changes as they happen (`changes.py`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from .changes import ChangeListener
from .dirwatch import directory_listener
from .locks import OwnerLock, exclusive, live_owners, new_owner_id
from .manifest import Manifest


class Transaction(Protocol):
    """What a writer may do while it holds the registry's exclusion (`Coordination.locked`)."""

    def read(self) -> Manifest: ...

    def write(self, manifest: Manifest) -> None: ...

    def join(self) -> None:
        """Mark this writer alive until `Coordination.close` or its process's death."""

    def live_owners(self) -> set[str]:
        """Writers still alive."""

    def collect(self, live: set[str]) -> None:
        """Drop what writers not in `live` left in the shared state (pins, half-written manifests)."""

    def pin(self, sha256: str) -> None: ...

    def unpin(self, sha256: str) -> None: ...

    def pinned(self, sha256: str, live: set[str]) -> bool:
        """Whether a live writer pins the blob (placed, not yet published)."""


class Coordination(Protocol):
    owner: str  # this writer's id: <host>-<pid>-<random>
    description: str  # where the state lives, for logs and status

    def locked(self) -> AbstractContextManager[Transaction]: ...

    def read(self) -> Manifest:
        """The manifest now, without the exclusion (it is only ever replaced whole)."""

    def listener(self) -> ChangeListener:
        """What tells this writer that another one changed the manifest (one per service start)."""

    def close(self) -> None:
        """This writer is gone: from here on its leftovers are anyone's to collect."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileCoordination:
    """`manifest.json`, `.lock`, `owners/<owner>.lock` and `tmp/<owner>.<sha256>.pin` in the registry dir."""

    def __init__(self, root: Path):
        self.root = root
        self.manifest_path = root / "manifest.json"
        self.lock_path = root / ".lock"
        self.owners = root / "owners"
        self.tmp = root / "tmp"
        self.owner = new_owner_id()
        self.description = str(root)
        self._owner_lock = OwnerLock(self.owners, self.owner)

    @contextmanager
    def locked(self) -> Iterator[FileTransaction]:
        for path in (self.owners, self.tmp):
            path.mkdir(parents=True, exist_ok=True)
        with exclusive(self.lock_path):
            yield FileTransaction(self)

    def read(self) -> Manifest:
        try:
            data = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return Manifest({})
        return Manifest.from_document(data, str(self.manifest_path))

    def listener(self) -> ChangeListener:
        return directory_listener(self.root, self.manifest_path.name)

    def close(self) -> None:
        self._owner_lock.release()


class FileTransaction:
    def __init__(self, files: FileCoordination):
        self.files = files

    def read(self) -> Manifest:
        return self.files.read()

    def write(self, manifest: Manifest) -> None:
        """Replace the manifest atomically: temp file in the same directory, fsync, rename, fsync the dir.
        Temp files only ever exist under the lock, so any one seen under it is a crashed writer's."""
        root = self.files.root
        fd, name = tempfile.mkstemp(dir=root, prefix=".manifest.", suffix=".json")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(manifest.document(), out, indent=2)
                out.flush()
                os.fsync(out.fileno())
            os.replace(name, self.files.manifest_path)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        _fsync_dir(root)

    def join(self) -> None:
        self.files._owner_lock.acquire()  # under the lock: a collector never sees the file unlocked

    def live_owners(self) -> set[str]:
        return live_owners(self.files.owners)

    def collect(self, live: set[str]) -> None:
        # Manifest temp files exist only under the lock we hold: any one here is a crashed writer's. Pins are
        # files in tmp/, which the registry collects with the dead writers' uploads.
        for stale in self.files.root.glob(".manifest.*.json"):
            stale.unlink(missing_ok=True)

    def _pin_path(self, sha256: str) -> Path:
        return self.files.tmp / f"{self.files.owner}.{sha256}.pin"

    def pin(self, sha256: str) -> None:
        self._pin_path(sha256).touch()

    def unpin(self, sha256: str) -> None:
        self._pin_path(sha256).unlink(missing_ok=True)

    def pinned(self, sha256: str, live: set[str]) -> bool:
        return any(p.name.split(".", 1)[0] in live for p in self.files.tmp.glob(f"*.{sha256}.pin"))


def coordination_for(root: Path, url: str | None) -> Coordination:
    """The backend a server uses: PostgreSQL when a registry URL is given, else files in `root`."""
    if url is None:
        return FileCoordination(root)
    from .postgres import PostgresCoordination

    return PostgresCoordination(url)
