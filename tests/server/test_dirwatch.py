"""`dirwatch`: which filesystems are watched with inotify and which polled, read from the mount table; a watch
hears the manifest renamed into place by another process, and only that; inotify that cannot be set up falls
back to polling."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from unlock_server.dirwatch import directory_listener, filesystem_type, polled

MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:50 / /mnt/shared rw,relatime shared:5 - nfs4 server:/export rw,vers=4.2
41 40 0:51 / /mnt/shared/local\\040disk rw,relatime - xfs /dev/vdb rw
42 27 0:52 / /mnt/sshfs rw,relatime - fuse.sshfs user@host:/data rw
43 27 0:53 / /mnt/tmp rw - tmpfs tmpfs rw
44 27 0:54 / /mnt/tmp rw - cifs //server/share rw
"""


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/srv/registry", "ext4"),
        ("/mnt/shared/registry", "nfs4"),
        ("/mnt/shared", "nfs4"),
        ("/mnt/shared/local disk/registry", "xfs"),  # a local disk mounted inside the NFS share
        ("/mnt/sharedother", "ext4"),  # a sibling whose name starts alike is not inside
        ("/mnt/sshfs/x", "fuse.sshfs"),
        ("/mnt/tmp/x", "cifs"),  # of two mounts on one point, the last one mounted shows
    ],
)
def test_the_filesystem_is_the_deepest_mount_above_the_path(path, fstype):
    assert filesystem_type(Path(path), MOUNTINFO) == fstype


@pytest.mark.skipif(shutil.which("findmnt") is None, reason="needs util-linux's findmnt")
def test_the_filesystem_of_a_real_directory_agrees_with_findmnt(tmp_path):
    found = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "-T", str(tmp_path)], capture_output=True, text=True
    )
    assert filesystem_type(tmp_path) == found.stdout.strip()


@pytest.mark.parametrize(
    "fstype", ["nfs", "nfs4", "cifs", "smb3", "9p", "virtiofs", "ceph", "fuse", "fuse.sshfs"]
)
def test_network_and_fuse_filesystems_are_polled(tmp_path, fstype):
    assert polled(fstype)
    listener = directory_listener(tmp_path, "manifest.json", fstype)
    assert (listener.mode, listener.connected) == ("poll", False)
    assert listener.note == f"{fstype} filesystem: inotify would not see other hosts' writes"


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs", "zfs", "tmpfs", "overlay"])
def test_local_filesystems_are_watched(fstype):
    assert not polled(fstype)


def test_a_watch_that_cannot_be_set_up_falls_back_to_polling(tmp_path):
    listener = directory_listener(tmp_path / "missing", "manifest.json", "ext4")
    assert listener.mode == "poll" and listener.note.startswith("inotify unavailable:")


RENAME = """
import os, sys
root = sys.argv[1]
for name in ("blobs-like.tmp", ".manifest.x.json"):  # other files: no wake
    with open(os.path.join(root, name), "w") as out:
        out.write("{}")
os.replace(os.path.join(root, ".manifest.x.json"), os.path.join(root, "manifest.json"))
"""


def test_the_manifest_renamed_into_place_by_another_process_wakes_the_listener(tmp_path):
    async def main() -> list[tuple[str, int | None]]:
        woken: list[tuple[str, int | None]] = []
        listener = directory_listener(tmp_path, "manifest.json", "ext4")
        assert listener.mode == "inotify"
        task = asyncio.create_task(listener.run(lambda *call: woken.append(call)))
        try:
            await asyncio.sleep(0.05)
            assert listener.connected and woken == [("catch_up", None)]
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", RENAME, str(tmp_path))
            assert await proc.wait() == 0
            for _ in range(100):
                if len(woken) > 1:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # nothing more comes
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert not listener.connected
        return woken

    assert asyncio.run(main()) == [("catch_up", None), ("inotify", None)]
    assert os.path.exists(tmp_path / "manifest.json")
