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


class PostgresServer:
    """A server in a new directory under /tmp (one its user can reach), listening on a Unix socket only;
    `stop` and `start` it again on the same data (the storage-fault tests take the database away mid-run)."""

    def __init__(self) -> None:
        self.bin_dir = server_binaries()
        self.root = Path(tempfile.mkdtemp(prefix="unlock-postgres-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self.data, self.sockets, self.log = (self.root / name for name in ("data", "sockets", "server.log"))
        self.running = False
        # The URL of its `postgres` database (superuser, trust auth).
        self.url = f"postgresql://postgres@/postgres?host={self.sockets}"

    def init(self) -> PostgresServer:
        _run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        _run("mkdir", str(self.sockets))
        return self

    def start(self) -> None:
        options = f"-k {self.sockets} -c listen_addresses='' -c fsync=off"
        pg_ctl = str(self.bin_dir / "pg_ctl")
        _run(pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        self.running = True

    def stop(self) -> None:
        """As a crash would: no checkpoint, the next start replays the log."""
        _run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        self.running = False

    def remove(self) -> None:
        try:
            if self.running:
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[str]:
    """A started `PostgresServer`, removed afterwards; yields the URL of its `postgres` database."""
    server = PostgresServer()
    try:
        server.init().start()
        yield server.url
    finally:
        server.remove()


def fresh_database(server_url: str) -> str:
    """A new empty database on the server; its URL."""
    import psycopg  # here, not at import: the vllm 0.33 check collects tests/server without the driver

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.replace("/postgres?", f"/{name}?")
