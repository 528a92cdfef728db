"""Two `CapabilityService`s (replicas) on one registry, in-process, each with a fake engine, on either
coordination backend (files, or a PostgreSQL database): what one writes reaches the other's engine, pushed
(inotify, LISTEN/NOTIFY) well within a poll interval, and by the poll where nothing is pushed or a push was
missed; each retires content itself."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from serve_harness import capability_bytes
from unlock_server import dirwatch
from unlock_server.changes import PollOnly
from unlock_server.coordination import coordination_for
from unlock_server.engine import EngineRPCError
from unlock_server.errors import APIError
from unlock_server.metrics import Metrics
from unlock_server.registry import Registry
from unlock_server.selection import Choice
from unlock_server.service import CapabilityService, ModelShape

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "scaleout"))
from lb import REGISTERED, SEEN, WRITTEN, slowest_seen  # noqa: E402

POLL = 0.1
LONG_POLL = 30.0  # no poll in a test's time: only a push explains a change arriving
PUSHED_WITHIN = {"file": 1.0, "postgres": 0.5}  # the goals for a change pushed to the other replica
V1 = capability_bytes("steer", seed=1)
V2 = capability_bytes("steer", seed=2)


class FakeWorkers:
    """What a replica's engine has registered; registering reads the blob, as the real workers do."""

    def __init__(self):
        self.registered: set[str] = set()

    async def register(self, path: str, sha256: str) -> None:
        assert Path(path).stat().st_size > 0
        self.registered.add(sha256)

    async def unregister(self, sha256: str) -> None:
        self.registered.discard(sha256)


def replica(root: Path, url: str | None = None, poll: float = POLL) -> CapabilityService:
    shape = ModelShape(served_names=["tiny"], num_layers=4, hidden_size=64)
    metrics = Metrics(CollectorRegistry())
    registry = Registry(root, coordination_for(root, url))
    return CapabilityService(registry, FakeWorkers(), shape, metrics, 1 << 20, 10.0, poll)


async def body(data: bytes):
    yield data


async def upload(service: CapabilityService, data: bytes, name: str | None = None, replace: bool = False):
    return (await service.upload(body(data), name, replace))[0]


def usable(service: CapabilityService, name: str) -> str | None:
    """The sha256 a request for `name` would steer with on this replica, None if it is refused."""
    try:
        return service.resolve("tiny", [Choice(name, None)])[0].entry.sha256
    except APIError:
        return None


async def served(service: CapabilityService, name: str) -> None:
    """Wait as a request for `name` would: until this replica's engine has its content."""
    await service.ready(service.resolve("tiny", [Choice(name, None)]))


async def until(predicate, within: float) -> float:
    """Seconds until `predicate()` holds; fails past `within`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < within, "not propagated in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture(params=["file", "postgres"])
def registry_url(request) -> str | None:
    """Where the pair's registry keeps its shared state: None for files, else a fresh database."""
    return request.getfixturevalue("postgres_url") if request.param == "postgres" else None


def syncs(service: CapabilityService, trigger: str) -> float:
    return service.metrics.syncs.labels(trigger)._value.get()


def listening(service: CapabilityService) -> bool:
    """Its listener hears changes, and its catch-up read has begun: a push from here on gets a sync of its
    own."""
    return service.listener.connected and syncs(service, "catch_up") == 1


@pytest.fixture
def backend(registry_url) -> str:
    return "file" if registry_url is None else "postgres"


def run_two(root: Path, url: str | None, scenario, poll: float = POLL, deaf_b: bool = False) -> None:
    """Run `scenario(a, b)` on two started replicas of one registry; `deaf_b`: b hears nothing pushed."""

    async def main():
        a, b = (replica(root, url, poll) for _ in "ab")
        if deaf_b:
            b.registry.listener = lambda: PollOnly("deaf for this test")
        await a.start()
        await b.start()
        try:
            await scenario(a, b)
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


@pytest.fixture
def run_pair(tmp_path, registry_url):
    return lambda scenario, **options: run_two(tmp_path / "shared", registry_url, scenario, **options)


def test_upload_replace_delete_propagate_within_the_poll_interval(run_pair):
    async def scenario(a: CapabilityService, b: CapabilityService) -> None:
        created = await upload(a, V1)
        sha1 = created["sha256"]
        assert usable(a, "steer") == sha1 and sha1 in a.workers.registered  # ready when the 201 returns
        await until(lambda: usable(b, "steer") == sha1, within=POLL + 1)
        await served(b, "steer")
        assert sha1 in b.workers.registered

        replaced = await upload(b, V2, replace=True)
        sha2 = replaced["sha256"]
        assert b.workers.registered == {sha2}
        await until(lambda: usable(a, "steer") == sha2, within=POLL + 1)
        await served(a, "steer")
        assert a.workers.registered == {sha2}  # a retired v1 on its own engine
        assert not a.registry.blob_path(sha1).exists()

        await b.delete("steer")
        await until(lambda: usable(a, "steer") is None, within=POLL + 1)
        assert a.workers.registered == set() and b.workers.registered == set()
        assert not a.registry.blob_path(sha2).exists()

        propagation = a.metrics.propagation.collect()[0].samples
        count = next(s.value for s in propagation if s.name.endswith("_count"))
        assert count == 2  # the replace and the delete, both by b
        status = a.sync_status()
        assert status["generation"] == 3 and 0 <= status["propagation"] < POLL + 1
        assert status["lag"] < POLL + 1 and status["loaded"] == 0

    run_pair(scenario)


def test_delete_elsewhere_waits_for_requests_in_flight_here(run_pair):
    async def scenario(a: CapabilityService, b: CapabilityService) -> None:
        sha = (await upload(a, V1))["sha256"]
        await until(lambda: usable(b, "steer") == sha, within=POLL + 1)
        applied = b.resolve("tiny", [Choice("steer", None)])
        b.acquire(applied)  # a stream on b uses it
        await b.ready(applied)
        await a.delete("steer")
        await until(lambda: usable(b, "steer") is None, within=POLL + 1)
        assert sha in b.workers.registered  # still composing the running request
        assert b.metrics.engine_capabilities._value.get() == 1
        b.release(applied)
        await until(lambda: sha not in b.workers.registered, within=1)
        assert b.metrics.engine_capabilities._value.get() == 0

    run_pair(scenario)


def test_a_delete_has_propagated_when_it_is_refused_not_when_the_engine_lets_go(run_pair):
    """Unregistering from a busy engine waits for a step; `propagation` (and its histogram) measures until
    requests here see the change, which for a delete is when the name is refused."""

    async def scenario(a: CapabilityService, b: CapabilityService) -> None:
        sha = (await upload(a, V1))["sha256"]
        await until(lambda: usable(b, "steer") == sha, within=POLL + 1)
        unregister = b.workers.unregister

        async def slow_unregister(sha256: str) -> None:
            await asyncio.sleep(1.5)
            await unregister(sha256)

        b.workers.unregister = slow_unregister
        await a.delete("steer")
        await until(lambda: sha not in b.workers.registered, within=POLL + 3)
        assert b.sync_status()["propagation"] < 1.0

    run_pair(scenario)


def test_a_replica_logs_where_a_slow_propagation_went(run_pair, backend, caplog, tmp_path):
    """Registering on a busy engine is the slow part here. The change is offered once it is read, and the
    log lines say when it was heard, read and offered, and when the engine had it."""

    async def scenario(a: CapabilityService, b: CapabilityService) -> None:
        register = b.workers.register

        async def slow_register(path: str, sha256: str) -> None:
            await asyncio.sleep(1.0)
            await register(path, sha256)

        b.workers.register = slow_register
        await until(lambda: listening(b), within=5)  # else its catch-up read, not the push, may bring it
        await upload(a, V1)
        await until(lambda: usable(b, "steer") is not None, within=POLL + 3)
        await served(b, "steer")

    with caplog.at_level(logging.INFO, logger="unlock_server.service"):
        run_pair(scenario, poll=LONG_POLL)
    pushed = {"file": "inotify", "postgres": "notify"}[backend]
    messages = [r.getMessage() for r in caplog.records]
    seen = [m for m in messages if "seen here" in m]
    assert len(seen) == 1, seen
    match = SEEN.search(seen[0])  # the pattern bench/scaleout reads these lines with
    total, trigger, heard = float(match[2]), match[3], float(match[4])
    synced, locked, read, offered = (float(match[i]) for i in range(5, 9))
    assert trigger == pushed and heard <= synced <= locked <= read <= total < 1.0
    assert total == pytest.approx(read + offered, abs=0.01)
    registered = [m for m in messages if REGISTERED.search(m)]
    assert len(registered) == 1, registered
    generation, registered_after = REGISTERED.search(registered[0]).groups()
    registered_after = float(registered_after)
    assert int(generation) == int(match[1]) and registered_after >= total + 0.99  # the engine's second
    written = [m for m in messages if "registered (" in m]
    (tmp_path / "a.log").write_text("\n".join(written) + "\n")
    (tmp_path / "b.log").write_text(f"INFO noise\n{seen[0]}\n{registered[0]}\n")
    committed = float(WRITTEN.search(written[0])[2])
    assert 0 <= committed <= total
    assert slowest_seen(tmp_path) == [  # how bench/scaleout reports them
        {"replica": "b", "generation": int(match[1]), "seen_s": total, "trigger": pushed,
         "committed_after_s": committed, "heard_after_s": heard, "synced_after_s": synced,
         "locked_after_s": locked, "read_after_s": read, "offered_in_s": offered,
         "registered_after_s": registered_after}
    ]  # fmt: skip


class HeldWorkers(FakeWorkers):
    """An engine in the middle of a long step: it answers registrations once `answer` is set, refusing them
    with `refusal` when one is given."""

    def __init__(self, refusal: EngineRPCError | None = None):
        super().__init__()
        self.answer = asyncio.Event()
        self.refusal = refusal

    async def register(self, path: str, sha256: str) -> None:
        await self.answer.wait()
        if self.refusal is not None:
            raise self.refusal
        await super().register(path, sha256)


def test_a_change_is_offered_before_the_engine_answers_and_its_requests_wait_for_it(run_pair):
    """Another replica's upload is usable here once read, not once this engine finishes its step: a request
    that selects it meanwhile is counted in flight and waits for the registration, then goes on."""

    async def scenario(a: CapabilityService, b: CapabilityService) -> None:
        b.workers = HeldWorkers()
        sha = (await upload(a, V1))["sha256"]
        await until(lambda: usable(b, "steer") == sha, within=POLL + 1)
        assert sha not in b.workers.registered and b.get("steer")["status"] == "ready"
        applied = b.resolve("tiny", [Choice("steer", None)])
        b.acquire(applied)
        request = asyncio.ensure_future(b.ready(applied))
        await asyncio.sleep(0.2)
        assert not request.done() and b.get("steer")["in_flight"] == 1
        b.workers.answer.set()
        await asyncio.wait_for(request, 1.0)
        assert sha in b.workers.registered
        b.release(applied)
        assert b.metrics.engine_capabilities._value.get() == 1

    run_pair(scenario)


def test_requests_waiting_for_a_change_the_engine_refuses_are_refused(run_pair):
    async def scenario(a: CapabilityService, b: CapabilityService) -> None:
        b.workers = HeldWorkers(EngineRPCError("registering failed on 1/1 workers: registry full", "full"))
        await upload(a, V1)
        await until(lambda: usable(b, "steer") is not None, within=POLL + 1)
        applied = b.resolve("tiny", [Choice("steer", None)])
        b.acquire(applied)
        request = asyncio.ensure_future(b.ready(applied))
        await asyncio.sleep(0.05)
        b.workers.answer.set()
        with pytest.raises(APIError) as err:
            await asyncio.wait_for(request, 1.0)
        assert (
            err.value.status == 400
            and "unavailable" in err.value.message
            and "registry full" in err.value.message
        )
        b.release(applied)
        assert usable(b, "steer") is None and b.get("steer")["status"] == "unavailable"
        assert b.workers.registered == set() and usable(a, "steer") is not None

    run_pair(scenario)


def test_a_change_deleted_while_the_engine_registers_it_leaves_nothing_registered(run_pair):
    """The unregistration waits for the registration it follows, or the engine would keep content nothing
    names."""

    async def scenario(a: CapabilityService, b: CapabilityService) -> None:
        b.workers = HeldWorkers()
        sha = (await upload(a, V1))["sha256"]
        await until(lambda: usable(b, "steer") == sha, within=POLL + 1)
        await a.delete("steer")
        await until(lambda: usable(b, "steer") is None, within=POLL + 1)  # refused, the engine still busy
        b.workers.answer.set()
        await until(lambda: not b._registering, within=1)
        await until(lambda: b.metrics.engine_capabilities._value.get() == 0, within=1)
        assert b.workers.registered == set()

    run_pair(scenario)


def test_an_upload_another_replica_published_first_logs_no_write_of_its_own(run_pair, caplog):
    """b's upload finds the same content named by a between b's look and b's publish: b writes nothing, and
    its log line must not time a commit it did not make."""

    async def scenario(a: CapabilityService, b: CapabilityService) -> None:
        register = b.workers.register

        async def a_publishes_first(path: str, sha256: str) -> None:
            b.workers.register = register
            await upload(a, V1)
            await register(path, sha256)

        b.workers.register = a_publishes_first
        await upload(b, V1)
        assert usable(b, "steer") == usable(a, "steer") is not None

    with caplog.at_level(logging.INFO, logger="unlock_server.service"):
        run_pair(scenario, poll=LONG_POLL)
    written = [r.getMessage() for r in caplog.records if "registered (" in r.getMessage()]
    assert len(written) == 2 and WRITTEN.search(written[0])
    assert written[1].endswith("already there (no write)") and not WRITTEN.search(written[1])


def test_writes_judge_conflicts_on_the_disk_not_a_stale_view(run_pair):
    async def scenario(a: CapabilityService, b: CapabilityService) -> None:
        b.poll_interval = 3600  # b (deaf) will not poll again: only its own writes read the disk
        await asyncio.sleep(POLL * 2)
        await upload(a, V1)
        with pytest.raises(APIError) as err:
            await upload(b, V2)  # b has not polled, but the name is taken on disk
        assert err.value.status == 409
        same, changed = await b.upload(body(V1), None, False)
        assert same["sha256"] == usable(a, "steer") and changed is False  # 200 unchanged, not 409 or 201
        await upload(b, V2, name="other")
        assert sorted(b.registry.read().entries) == ["other", "steer"]
        assert usable(b, "steer") is not None  # b's write applied a's entry to b's engine too

    run_pair(scenario, deaf_b=True)


def test_a_restarted_replica_registers_everything(run_pair, tmp_path, registry_url):
    async def scenario(a: CapabilityService, b: CapabilityService) -> None:
        sha = (await upload(a, V1))["sha256"]
        await upload(a, V2, name="second")
        await b.stop()
        fresh = replica(tmp_path / "shared", registry_url)
        await fresh.start()
        try:
            assert usable(fresh, "steer") == sha and usable(fresh, "second") is not None
            assert len(fresh.workers.registered) == 2
            assert [c["status"] for c in fresh.list()] == ["ready", "ready"]
        finally:
            await fresh.stop()

    run_pair(scenario)


def test_stop_ends_following_even_when_a_change_is_heard_in_the_same_moment(tmp_path):
    """A wake and the stop's cancellation landing together once made the follower swallow the cancel
    (`asyncio.wait_for` on Python 3.11 returns a result that is ready instead of raising), so `stop` waited
    for it forever."""

    async def main():
        service = replica(tmp_path / "shared")
        await service.start()
        await asyncio.sleep(0.05)  # the follower is waiting for a wake or the poll
        service._wake("inotify", None)
        await asyncio.wait_for(service.stop(), 5.0)
        assert all(task.done() for task in service._followers)

    asyncio.run(main())


class RefusingWorkers(FakeWorkers):
    async def register(self, path: str, sha256: str) -> None:
        raise EngineRPCError(f"registering {sha256[:12]} failed on 1/1 workers: registry full")


def test_an_upload_the_engine_refuses_leaves_the_shared_directory_as_it_was(run_pair):
    async def scenario(a: CapabilityService, b: CapabilityService) -> None:
        await upload(a, V1)
        before = a.registry.read()
        b.workers = RefusingWorkers()
        with pytest.raises(APIError) as err:
            await upload(b, V2, name="refused")
        assert err.value.status == 500 and "registry full" in err.value.message
        assert a.registry.read() == before
        assert len(list(a.registry.blobs.iterdir())) == 1 and list(a.registry.tmp.iterdir()) == []
        assert usable(a, "steer") is not None

    run_pair(scenario)


def test_poll_interval_comes_from_the_flag_the_environment_or_the_default(monkeypatch):
    from pydantic import ValidationError
    from unlock_server.cli import build_parser, prepare_environment, settings_from_args

    prepare_environment()
    parser = build_parser()
    assert settings_from_args(parser.parse_args([])).registry_poll_interval == 2.0
    monkeypatch.setenv("UNLOCK_REGISTRY_POLL_INTERVAL", "0.5")
    assert settings_from_args(parser.parse_args([])).registry_poll_interval == 0.5
    flag = parser.parse_args(["--registry-poll-interval", "3"])
    assert settings_from_args(flag).registry_poll_interval == 3.0
    assert settings_from_args(flag).registry_url is None  # files next to the blobs
    monkeypatch.setenv("UNLOCK_REGISTRY_URL", "postgresql://env/db")
    assert settings_from_args(parser.parse_args([])).registry_url == "postgresql://env/db"
    flag = parser.parse_args(["--registry-url", "postgresql://flag/db"])
    assert settings_from_args(flag).registry_url == "postgresql://flag/db"
    with pytest.raises(ValidationError, match="registry_poll_interval must be positive"):
        settings_from_args(parser.parse_args(["--registry-poll-interval", "0"]))


def test_changes_are_pushed_to_the_other_replica_well_within_a_poll(run_pair, backend):
    """With a 30 s poll, only the push (inotify on the directory, LISTEN/NOTIFY on the database) can bring an
    upload, a replace and a delete to the other replica in time."""
    mode, within = {"file": "inotify", "postgres": "notify"}[backend], PUSHED_WITHIN[backend]

    async def scenario(a: CapabilityService, b: CapabilityService) -> None:
        await until(lambda: listening(a) and listening(b), within=5)
        for service in (a, b):
            status = service.sync_status()
            assert (status["sync"], status["listening"], status["sync_note"]) == (mode, True, None)
        sha1 = (await upload(a, V1))["sha256"]
        await until(lambda: usable(b, "steer") == sha1, within)
        sha2 = (await upload(b, V2, replace=True))["sha256"]
        await until(lambda: usable(a, "steer") == sha2, within)
        await a.delete("steer")
        await until(lambda: usable(b, "steer") is None, within)
        assert b.workers.registered == set()
        for service in (a, b):
            assert syncs(service, "poll") == 0 and syncs(service, mode) >= 1
        if backend == "postgres":  # a notification announces its generation: a replica's own are not read
            assert (syncs(a, "notify"), syncs(b, "notify")) == (1, 2)  # b's replace; a's upload and delete

    run_pair(scenario, poll=LONG_POLL)


def hold_reconnects(listener) -> asyncio.Event:
    """Make the database listener wait for the returned event before each connection it opens."""
    gate, connect = asyncio.Event(), listener.connect

    async def gated():
        await gate.wait()
        return await connect()

    listener.connect = gated
    return gate


def drop(listener, url: str) -> None:
    """End the listener's session from another one, as a database restart or a network fault would."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,)).fetchone()[0]


async def deafen(service: CapabilityService, url: str) -> asyncio.Event:
    """Drop `service`'s listener and keep it from reconnecting until the returned event is set."""
    await until(lambda: service.listener.connected, within=5)
    gate = hold_reconnects(service.listener)
    await asyncio.to_thread(drop, service.listener, url)
    await until(lambda: not service.listener.connected, within=2)
    status = service.sync_status()
    assert status["sync"] == "notify" and status["listening"] is False
    assert status["sync_note"].startswith("reconnecting")
    return gate


def test_a_missed_notification_is_caught_up_within_a_poll_interval(tmp_path, postgres_url):
    poll = 1.0

    async def scenario(a: CapabilityService, b: CapabilityService) -> None:
        gate = await deafen(b, postgres_url)
        sha1 = (await upload(a, V1))["sha256"]  # its NOTIFY reaches no listener of b's
        await until(lambda: usable(b, "steer") == sha1, within=poll + 0.5)
        # Neither a notification nor a catch-up after the first LISTEN brought it: the poll did.
        assert (syncs(b, "notify"), syncs(b, "catch_up")) == (0, 1) and syncs(b, "poll") >= 1

        b.poll_interval = LONG_POLL  # from its next sync on, b hears changes by push or not at all
        gate.set()
        await until(lambda: b.listener.connected and syncs(b, "catch_up") == 2, within=2)
        sha2 = (await upload(a, V2, replace=True))["sha256"]
        await until(lambda: usable(b, "steer") == sha2, within=PUSHED_WITHIN["postgres"])
        assert syncs(b, "notify") == 1  # notifications arrive again after the reconnect

    run_two(tmp_path / "shared", postgres_url, scenario, poll=poll)


def test_a_change_made_while_the_listener_was_down_is_read_when_it_reconnects(tmp_path, postgres_url):
    async def scenario(a: CapabilityService, b: CapabilityService) -> None:
        gate = await deafen(b, postgres_url)
        sha = (await upload(a, V1))["sha256"]
        await asyncio.sleep(0.5)
        assert usable(b, "steer") is None  # nothing pushed to b, and no poll for 30 s
        gate.set()
        await until(lambda: usable(b, "steer") == sha, within=1)
        assert syncs(b, "catch_up") == 2  # at the first LISTEN, and at the one after the gap

    run_two(tmp_path / "shared", postgres_url, scenario, poll=LONG_POLL)


def test_a_registry_on_a_network_filesystem_is_polled(tmp_path, monkeypatch):
    monkeypatch.setattr(dirwatch, "filesystem_type", lambda path: "nfs4")

    async def scenario(a: CapabilityService, b: CapabilityService) -> None:
        status = b.sync_status()
        assert (status["sync"], status["listening"]) == ("poll", False)
        assert status["sync_note"] == "nfs4 filesystem: inotify would not see other hosts' writes"
        sha = (await upload(a, V1))["sha256"]
        await until(lambda: usable(b, "steer") == sha, within=POLL + 1)
        assert syncs(b, "poll") >= 1 and syncs(b, "inotify") == 0

    run_two(tmp_path / "shared", None, scenario)
