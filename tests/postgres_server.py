"""A throwaway PostgreSQL server for the tests of the registry's database backend: `initdb` into a temporary
directory, `pg_ctl start` listening on a Unix socket only, one fresh database per test. Runs the server as the
`postgres` user when the tests run as root (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

INSTALL_HINT = "install Debian's package `postgresql` (scripts/install.sh test does)"


def server_binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found and shutil.which("initdb"):
        found = [shutil.which("initdb")]
    if not found:
        raise RuntimeError(f"no PostgreSQL server binaries (initdb, pg_ctl) on this machine: {INSTALL_HINT}")
    return Path(found[-1]).parent


def _run(*cmd: str) -> None:
    # As root, as the `postgres` user: PostgreSQL refuses to run as root.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    proc = subprocess.run([*as_user, *cmd], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr or proc.stdout}")


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server in a new directory under /tmp (one its user can reach); yields a URL of its `postgres`
    database (superuser, trust auth, a Unix socket only)."""
    bin_dir = server_binaries()
    root = Path(tempfile.mkdtemp(prefix="unlock-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    try:
        _run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        _run("mkdir", str(sockets))
        options = f"-k {sockets} -c listen_addresses='' -c fsync=off"
        _run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
        try:
            yield f"postgresql://postgres@/postgres?host={sockets}"
        finally:
            _run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new empty database on the server; its URL."""
    import psycopg  # here, not at import: the vllm 0.33 check collects tests/server without the driver

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.replace("/postgres?", f"/{name}?")
