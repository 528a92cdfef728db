"""inotify on a registry directory: the manifest is replaced by a rename into the directory
(`coordination.py`), so a watch on the directory for files moved in (or written in place) hears every change.

inotify reports changes made through this host's kernel: other processes on this host (replicas sharing a
local directory), but not other hosts' writes to a network filesystem. On those (`POLLED_FILESYSTEMS`), and
wherever inotify cannot be set up, the replica relies on its poll alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path

from inotify_simple import INotify, flags

from .changes import CATCH_UP, ChangeListener, PollOnly, Wake

logger = logging.getLogger(__name__)

MODE = "inotify"
# Filesystem types (as /proc/self/mountinfo names them) whose other clients' writes raise no local event.
POLLED_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "virtiofs", "ceph", "glusterfs", "lustre", "gpfs", "afs"}
)
WATCHED = flags.MOVED_TO | flags.CLOSE_WRITE


def polled(fstype: str) -> bool:
    """Whether a directory on `fstype` must be polled: a network filesystem, or any FUSE one (sshfs, s3fs,
    gcsfuse, ...), whose remote writes never reach this kernel's inotify."""
    return fstype in POLLED_FILESYSTEMS or fstype.split(".", 1)[0] == "fuse"


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (`\\040`)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def filesystem_type(path: Path, mountinfo: str | None = None) -> str:
    """The type of the filesystem holding `path`: that of the deepest mount point above it (the last one
    mounted there, if several are stacked)."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    target = os.path.realpath(path)
    best, fstype = "", "unknown"
    for line in mountinfo.splitlines():
        # <id> <parent> <major:minor> <root> <mount point> <options> [optional...] - <type> <source> ...
        fields, _, tail = line.partition(" - ")
        mount_point = _unescape(fields.split()[4])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fstype = mount_point, tail.split()[0]
    return fstype


class InotifyListener:
    """Wakes the service when `name` is renamed into place or written; owns the watch it is given."""

    mode = MODE
    note = None

    def __init__(self, watch: INotify, name: str):
        self.watch, self.name = watch, name
        self.connected = False

    async def run(self, wake: Wake) -> None:
        loop = asyncio.get_running_loop()
        fd = self.watch.fileno()
        loop.add_reader(fd, self._read, wake)
        self.connected = True
        try:
            wake(CATCH_UP, None)  # a change between the service's first read and the watch
            await loop.create_future()  # events arrive through the reader until cancelled
        finally:
            self.connected = False
            loop.remove_reader(fd)
            self.watch.close()

    def _read(self, wake: Wake) -> None:
        events = self.watch.read(timeout=0)
        # An overflowed queue lost events: one of them may have been the manifest's.
        if any(e.name == self.name or e.mask & flags.Q_OVERFLOW for e in events):
            wake(MODE, None)


def directory_listener(root: Path, name: str, fstype: str | None = None) -> ChangeListener:
    """inotify on `root` for `name`, or polling alone where that would miss writes (reason logged)."""
    fstype = fstype or filesystem_type(root)
    if polled(fstype):
        note = f"{fstype} filesystem: inotify would not see other hosts' writes"
        logger.info("capability registry %s: polling only (%s)", root, note)
        return PollOnly(note)
    try:
        watch = INotify(nonblocking=True)
    except OSError as err:  # EMFILE: this user's inotify instances are used up
        return _poll_because(root, f"inotify unavailable: {err}")
    try:
        watch.add_watch(root, WATCHED)
    except OSError as err:  # ENOSPC: the user's inotify watches are used up (fs.inotify.max_user_watches)
        watch.close()
        return _poll_because(root, f"inotify unavailable: {err}")
    return InotifyListener(watch, name)


def _poll_because(root: Path, note: str) -> PollOnly:
    logger.warning("capability registry %s: polling only (%s)", root, note)
    return PollOnly(note)
