"""Several writers on one registry, in-process: each `Registry` is one replica, with either coordination
backend (flock locks an open file description and each PostgreSQL writer has its own connections, so two
objects in one process exclude each other as two processes do). A writer killed for real: the last test."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from unlock_server.coordination import coordination_for
from unlock_server.errors import APIError
from unlock_server.postgres import LIVE_WRITERS, PostgresCoordination
from unlock_server.registry import Registry

from tests.server.test_registry import entry, stage


@pytest.fixture(params=["file", "postgres"])
def backend(request, tmp_path) -> tuple[Path, str | None]:
    """One registry: its blob directory, and the URL of its database (None: files in that directory)."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    return tmp_path / "shared", url


@pytest.fixture
def writer(backend) -> Callable[[], Registry]:
    """Makes writers of the registry."""
    root, url = backend
    return lambda: Registry(root, coordination_for(root, url))


@pytest.fixture
def replicas(writer):
    """Writers A and B, both open on one registry before either writes."""
    opened = [writer(), writer()]
    for reg in opened:
        reg.open()
    yield opened
    for reg in opened:
        reg.close()


def add(registry: Registry, name: str, content: bytes, replace: bool = False) -> str:
    staged = stage(registry, content)
    registry.place(staged)
    registry.publish(entry(name, staged.sha256), replace=replace)
    return staged.sha256


def test_an_upload_through_a_is_read_by_b(replicas):
    a, b = replicas
    sha = add(a, "cot", b"one")
    manifest = b.read()
    assert manifest.entries["cot"].sha256 == sha and manifest.writer == a.owner
    assert b.blob_path(sha).read_bytes() == b"one"


def test_writes_by_b_keep_a_s_entries(replicas):
    a, b = replicas
    add(a, "from-a", b"one")
    add(b, "from-b", b"two")
    add(a, "again-a", b"three")
    b.remove("absent")
    manifest = a.read()
    assert sorted(manifest.entries) == ["again-a", "from-a", "from-b"]
    assert manifest.generation == 3  # a miss writes nothing


def test_concurrent_writers_lose_no_update(replicas):
    """Interleaved read-modify-writes from two threads: without the lock some names would be lost."""
    a, b = replicas

    def write(registry: Registry, prefix: str) -> None:
        for i in range(25):
            add(registry, f"{prefix}{i}", f"{prefix}{i}".encode())

    threads = [threading.Thread(target=write, args=(r, p)) for r, p in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    manifest = a.read()
    assert len(manifest.entries) == 50 and manifest.generation == 50
    assert len(list(a.blobs.iterdir())) == 50


def test_b_starting_keeps_a_s_upload_in_flight_and_its_unpublished_blob(replicas, writer):
    a, _ = replicas
    pending = stage(a, b"placed, not yet published")
    a.place(pending)  # A is now registering it on its engine

    async def scenario() -> None:
        gate = asyncio.Event()

        async def slow_body():
            yield b"first half "
            await gate.wait()
            yield b"second half"

        upload = asyncio.create_task(a.stage(slow_body(), 1 << 20))
        await asyncio.sleep(0.05)
        in_flight = [p for p in a.tmp.iterdir() if p.suffix == ".upload"]
        assert len(in_flight) == 1
        c = writer()
        c.open()  # a replica starting (or restarting) while A works
        c.close()
        assert in_flight[0].exists() and a.blob_path(pending.sha256).exists()
        gate.set()
        staged = await upload
        assert staged.path.read_bytes() == b"first half second half"

    asyncio.run(scenario())
    a.publish(entry("late", pending.sha256), replace=False)
    assert a.blob_path(pending.sha256).read_bytes() == b"placed, not yet published"


def test_a_dead_writer_s_leftovers_are_collected(replicas, writer):
    a, b = replicas
    orphan = stage(a, b"orphan")
    a.place(orphan)
    stage(a, b"half an upload")
    a.close()  # A dies: its owner lock is free
    c = writer()
    c.open()
    c.close()
    assert not b.blob_path(orphan.sha256).exists()
    assert list(b.tmp.iterdir()) == []
    assert b.writers() == {b.owner}


def test_delete_on_b_keeps_a_blob_still_named_or_pinned(replicas):
    a, b = replicas
    shared = add(a, "cot", b"same bytes")
    add(a, "cot-copy", b"same bytes")
    b.remove("cot")
    assert a.blob_path(shared).exists()  # "cot-copy" still names it

    pending = stage(a, b"same bytes")
    a.place(pending)  # A re-uploads that content under a new name, not yet published
    b.remove("cot-copy")
    assert a.blob_path(shared).exists()  # pinned by A
    a.publish(entry("cot-again", pending.sha256), replace=False)
    assert b.read().entries["cot-again"].sha256 == shared and a.blob_path(shared).exists()

    b.remove("cot-again")
    assert not a.blob_path(shared).exists()  # nothing names or pins it now


def test_a_name_taken_since_the_check_is_409_and_the_loser_s_blob_goes(replicas):
    a, b = replicas
    theirs, ours = stage(a, b"a's content"), stage(b, b"b's content")
    a.place(theirs)
    b.place(ours)
    a.publish(entry("race", theirs.sha256), replace=False)
    with pytest.raises(APIError) as err:
        b.publish(entry("race", ours.sha256), replace=False)
    assert err.value.status == 409 and "replace=true" in err.value.message
    b.release(ours.sha256)
    assert not b.blob_path(ours.sha256).exists() and a.blob_path(theirs.sha256).exists()
    assert b.read().entries["race"].sha256 == theirs.sha256


def test_replace_by_b_supersedes_a_and_the_old_blob_can_go(replicas):
    a, b = replicas
    old = add(a, "cot", b"v1")
    new = add(b, "cot", b"v2", replace=True)
    assert a.read().entries["cot"].sha256 == new
    b.drop_blob(old)
    assert not a.blob_path(old).exists() and a.blob_path(new).exists()


KILLED_WRITER = """
import asyncio, sys, time
from pathlib import Path
from unlock_server.coordination import coordination_for
from unlock_server.registry import Registry

async def body(data):
    yield data

root, url = Path(sys.argv[1]), sys.argv[2] or None
registry = Registry(root, coordination_for(root, url))
registry.open()
registry.place(asyncio.run(registry.stage(body(b"placed by the writer about to die"), 1 << 20)))
asyncio.run(registry.stage(body(b"an upload in flight"), 1 << 20))
print(registry.owner, flush=True)
time.sleep(600)
"""


def test_a_writer_killed_with_sigkill_is_seen_dead_and_its_leftovers_collected(replicas, backend, writer):
    """A real process, killed mid-registration: the kernel (files) or the database server (PostgreSQL) frees
    its liveness lock, and the next writer to open collects its pinned blob and its upload."""
    a, _ = replicas
    root, url = backend
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(root), url or ""], stdout=subprocess.PIPE, text=True
    )
    try:
        owner = child.stdout.readline().strip()
        assert owner and owner in a.writers()
        assert len(list(a.blobs.iterdir())) == 1 and len(list(a.tmp.glob(f"{owner}.*.upload"))) == 1
        a.drop_blob(next(a.blobs.iterdir()).stem)
        assert len(list(a.blobs.iterdir())) == 1  # pinned by a live writer: kept
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    deadline = time.monotonic() + 10
    while owner in a.writers() and time.monotonic() < deadline:
        time.sleep(0.05)  # the database server notices the closed connection within milliseconds
    assert owner not in a.writers()
    c = writer()
    c.open()
    c.close()
    assert list(a.blobs.iterdir()) == [] and list(a.tmp.iterdir()) == []


def test_a_closed_postgres_writer_is_not_live_the_moment_close_returns(postgres_url):
    """close() releases the advisory lock itself: left to the connection's end, the lock outlives close()
    until the server's backend has exited, and a writer looking then sees the closed one as alive (and keeps
    its pins). Twenty rounds, each looking from an open connection right after close(): without the explicit
    unlock, at least one round sees the lock (checked by removing it)."""
    with psycopg.connect(postgres_url, autocommit=True) as observer:

        def live() -> set[str]:
            return {owner for (owner,) in observer.execute(LIVE_WRITERS).fetchall()}

        for _ in range(20):
            closing = PostgresCoordination(postgres_url)
            with closing.locked() as tx:
                tx.join()
            assert closing.owner in live()
            closing.close()
            assert closing.owner not in live()


def test_a_postgres_writer_reuses_its_connections_and_replaces_one_the_server_dropped(postgres_url):
    """Reads and transactions go over kept connections (a new one costs the server a backend and an
    authentication: tenths of a second on a busy host); one the server ended is noticed and replaced, so the
    next read answers instead of failing."""
    with psycopg.connect(postgres_url, autocommit=True) as observer:

        def backends() -> set[int]:
            rows = observer.execute(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
            return {pid for (pid,) in rows}

        coordination = PostgresCoordination(postgres_url)
        with coordination.locked() as tx:
            tx.write(tx.read().successor({}, coordination.owner))
        before = backends()
        for _ in range(5):
            coordination.read()
            with coordination.locked() as tx:
                tx.read()
        assert len(before) == 1 and backends() == before  # the ten operations went over that one connection
        for pid in before:
            observer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert coordination.read().generation == 1
        coordination.close()
