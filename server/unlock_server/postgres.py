"""The registry's shared state in PostgreSQL (`unlock-serve --registry-url postgresql://...`), for shared
filesystems whose locks are not reliable (NFS with local locks, SMB, object-store mounts). The blobs stay
content-addressed files in the shared directory: writing one is an atomic rename of identical content, which
needs no lock; everything writers must agree on is here:

- `unlock_manifest`: one row holding the manifest document (the same JSON as `manifest.json`);
- `unlock_writers`: each live writer's id and the key of a session-level advisory lock it holds on a
  connection of its own for as long as it runs. PostgreSQL releases that lock when the connection ends,
  however the process died, so "is the lock held?" is a crash-proof liveness test, as `flock` is for files;
- `unlock_pins`: blobs placed but not yet published, by writer.

Each manifest write sends `NOTIFY unlock_manifest, '<generation>'` in its transaction, delivered at commit to
every replica's listener (`pglisten.py`).

Exclusion is a transaction-level advisory lock taken first in every `locked()` transaction; the tables are
created under it on first use. One registry per database; give several registries one database each, or a
schema each through the URL (`?options=-csearch_path%3Dmyschema`).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .locks import new_owner_id
from .manifest import Manifest

if TYPE_CHECKING:
    from .pglisten import DatabaseListener

# Seconds a connection attempt may take unless the URL sets `connect_timeout`: an unreachable database then
# fails a registry write with 503 (`storage.py`) instead of holding it until the client gives up.
CONNECT_TIMEOUT_S = 5
# TCP keepalives of the listener's connection unless the URL sets them: a connection a network partition
# dropped silently is given up within about 20 s (it would otherwise wait for data that never comes).
LISTENER_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
}
# Connections kept open between registry operations. A new one costs the server a backend process and an
# authentication, which on a busy host took a replica's read of a pushed change from milliseconds to tenths of
# a second. The serving replica makes one registry call at a time (each under its service lock), so it reuses
# one; the second is for a caller on another thread beside it.
IDLE_CONNECTIONS = 2
REGISTRY_LOCK = 0x756E6C6F636B  # "unlock": the transaction lock every change takes first
CHANNEL = "unlock_manifest"  # what manifest writes NOTIFY
SCHEMA = """
CREATE TABLE IF NOT EXISTS unlock_manifest (
    id integer PRIMARY KEY CHECK (id = 1),
    document jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS unlock_writers (
    owner text PRIMARY KEY,
    lock_key bigint NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS unlock_pins (
    owner text NOT NULL,
    sha256 text NOT NULL,
    PRIMARY KEY (owner, sha256)
);
"""
# The writers whose advisory lock is granted to some session now (a bigint key shows in pg_locks as its high
# and low 32 bits, in classid and objid, with objsubid 1).
LIVE_WRITERS = """
SELECT w.owner FROM unlock_writers w
WHERE EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid::bigint = (w.lock_key >> 32) AND l.objid::bigint = (w.lock_key & 4294967295)
)
"""


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise SystemExit(
            "unlock-serve: --registry-url needs the PostgreSQL driver: pip install 'unlock-serve[postgres]'"
        ) from None
    return psycopg


class PostgresCoordination:
    def __init__(self, url: str):
        self.psycopg = _psycopg()
        self.url = url
        given = self.psycopg.conninfo.conninfo_to_dict(url)
        self._connect_options = {} if "connect_timeout" in given else {"connect_timeout": CONNECT_TIMEOUT_S}
        self.owner = new_owner_id()
        self.description = "postgresql database " + self._redacted(url)
        self._lock_key = secrets.randbits(62)
        self._session: Any = None  # the connection that holds this writer's advisory lock
        self._session_lock = threading.Lock()
        self._idle: list[Any] = []  # autocommit connections for reads and transactions, not in use
        self._idle_lock = threading.Lock()
        self._joined = False

    @staticmethod
    def _redacted(url: str) -> str:
        scheme, sep, rest = url.partition("://")
        if "@" in rest:
            credentials, _, host = rest.rpartition("@")
            rest = f"{credentials.split(':', 1)[0]}:***@{host}" if ":" in credentials else rest
        return scheme + sep + rest

    def _connect(self):
        return self.psycopg.connect(self.url, autocommit=True, **self._connect_options)

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """An autocommit connection: an idle one that still answers, else a new one. It goes back to the idle
        ones after a use that ended cleanly, and is closed after one that raised."""
        conn = self._reusable() or self._connect()
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        with self._idle_lock:
            if len(self._idle) < IDLE_CONNECTIONS and not conn.closed:
                self._idle.append(conn)
                return
        conn.close()

    def _reusable(self) -> Any:
        while True:
            with self._idle_lock:
                if not self._idle:
                    return None
                conn = self._idle.pop()
            if self._answers(conn):
                return conn

    @contextmanager
    def locked(self) -> Iterator[PostgresTransaction]:
        with self._connection() as conn, conn.transaction():  # commits on success, rolls back on error
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (REGISTRY_LOCK,))
            conn.execute(SCHEMA)
            tx = PostgresTransaction(self, conn)
            if self._joined:
                tx.join()  # a no-op while the liveness session lives; takes the lock again if it dropped
            yield tx

    def listener(self) -> DatabaseListener:
        from .pglisten import DatabaseListener  # imports psycopg, which `_psycopg` checked for first

        given = self.psycopg.conninfo.conninfo_to_dict(self.url)
        options = {
            **self._connect_options,
            **{k: v for k, v in LISTENER_KEEPALIVES.items() if k not in given},
        }

        async def connect():
            return await self.psycopg.AsyncConnection.connect(self.url, autocommit=True, **options)

        return DatabaseListener(connect, CHANNEL)

    def read(self) -> Manifest:
        with self._connection() as conn:
            try:
                row = conn.execute("SELECT document FROM unlock_manifest WHERE id = 1").fetchone()
            except self.psycopg.errors.UndefinedTable:
                return Manifest({})
        return _manifest(row)

    def hold_liveness(self) -> None:
        """Take this writer's advisory lock on a connection of its own (once; again after it dropped)."""
        with self._session_lock:
            if self._session_usable():
                return
            self._session = self._connect()
            self._session.execute("SELECT pg_advisory_lock(%s)", (self._lock_key,))

    def _session_usable(self) -> bool:
        """Whether the liveness connection still holds the lock (a connection that answers keeps it)."""
        return self._session is not None and self._answers(self._session)

    def _answers(self, conn: Any) -> bool:
        """Whether `conn` still works. A round trip, since a connection the server dropped (a restart) looks
        open until it is used; one that fails is closed, to be made again."""
        if conn.closed or conn.broken:
            return False
        try:
            conn.execute("SELECT 1")
        except self.psycopg.Error:
            conn.close()
            return False
        return True

    def close(self) -> None:
        self._joined = False
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        with self._session_lock:
            if self._session is not None:
                # Unlock before closing: the server frees a closed session's locks only once its backend has
                # exited, a moment after close() returns, and a writer opening then would think us alive.
                # (A writer that dies without closing is freed that way, a moment later.)
                if self._session_usable():
                    try:
                        self._session.execute("SELECT pg_advisory_unlock(%s)", (self._lock_key,))
                    except self.psycopg.Error:
                        pass  # the connection is going anyway; the server frees the lock with it
                self._session.close()
                self._session = None


def _manifest(row: tuple | None) -> Manifest:
    if row is None:
        return Manifest({})
    document = row[0] if isinstance(row[0], dict) else json.loads(row[0])
    return Manifest.from_document(document, "unlock_manifest")


class PostgresTransaction:
    def __init__(self, pg: PostgresCoordination, conn: Any):
        self.pg, self.conn = pg, conn

    def read(self) -> Manifest:
        return _manifest(self.conn.execute("SELECT document FROM unlock_manifest WHERE id = 1").fetchone())

    def write(self, manifest: Manifest) -> None:
        # One round trip for the row and its notification: the time from the manifest's `updated_at` to the
        # commit is time other replicas wait.
        self.conn.execute(
            "WITH written AS (INSERT INTO unlock_manifest (id, document) VALUES (1, %s) "
            "ON CONFLICT (id) DO UPDATE SET document = EXCLUDED.document RETURNING id) "
            "SELECT pg_notify(%s, %s) FROM written",
            (json.dumps(manifest.document()), CHANNEL, str(manifest.generation)),
        )

    def join(self) -> None:
        self.pg.hold_liveness()  # held before the row is visible: nobody sees this writer as dead
        self.pg._joined = True
        self.conn.execute(
            "INSERT INTO unlock_writers (owner, lock_key) VALUES (%s, %s) ON CONFLICT (owner) DO NOTHING",
            (self.pg.owner, self.pg._lock_key),
        )

    def live_owners(self) -> set[str]:
        live = {owner for (owner,) in self.conn.execute(LIVE_WRITERS).fetchall()}
        self.conn.execute("DELETE FROM unlock_writers WHERE NOT (owner = ANY(%s))", (list(live),))
        return live

    def collect(self, live: set[str]) -> None:
        self.conn.execute("DELETE FROM unlock_pins WHERE NOT (owner = ANY(%s))", (list(live),))

    def pin(self, sha256: str) -> None:
        self.conn.execute(
            "INSERT INTO unlock_pins (owner, sha256) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (self.pg.owner, sha256),
        )

    def unpin(self, sha256: str) -> None:
        self.conn.execute("DELETE FROM unlock_pins WHERE owner = %s AND sha256 = %s", (self.pg.owner, sha256))

    def pinned(self, sha256: str, live: set[str]) -> bool:
        owners = self.conn.execute("SELECT owner FROM unlock_pins WHERE sha256 = %s", (sha256,)).fetchall()
        return any(owner in live for (owner,) in owners)
