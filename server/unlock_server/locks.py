"""File locks for a registry directory shared by several writers (replicas on one volume).

`exclusive(path)` serialises manifest changes across processes and hosts. Each writer also holds an owner lock
(`owners/<owner>.lock`) for as long as it runs: the kernel (or the NFS server, after its lease) releases it
when the process dies, however it dies, so "is this lock free?" is a crash-proof test of whether the writer
that left a file behind is gone.

flock(2) locks an open file description: two `Registry` objects in one process exclude each other exactly as
two processes do, which is what the in-process tests rely on.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if absent) for the block; blocks until it is free."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def new_owner_id() -> str:
    """host-pid-random: readable in a listing, unique across hosts and pid reuse, and free of dots (file names
    are split on the first dot to find their owner)."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


class OwnerLock:
    """This writer's lock in `owners/`, held from `acquire` until `release` or the process's death."""

    def __init__(self, owners_dir: Path, owner: str):
        self.path = owners_dir / f"{owner}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Call with the registry lock held, so a collector never sees the file before it is locked."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh random name: nobody else holds it
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def live_owners(owners_dir: Path) -> set[str]:
    """Owners whose lock is held; dead owners' lock files are removed. Call with the registry lock held."""
    live = set()
    for path in owners_dir.glob("*.lock"):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # released by its owner just now
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            live.add(path.stem)
        else:
            path.unlink(missing_ok=True)  # its owner is gone; we hold the lock, so nobody reuses it meanwhile
        finally:
            os.close(fd)
    return live
