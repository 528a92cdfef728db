"""Two real `unlock-serve` replicas on one capabilities directory, each vLLM CPU engine on its own core:
uploads, replaces and deletes through one are usable (or refused) on the other as soon as inotify tells it
(the poll is too slow to explain it), steered outputs agree, and a replica killed with SIGKILL comes back with
the whole registry."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_harness import ServerProcess, capability_bytes, engine_stopped, in_flight, tiny_server

POLL_S = 30.0  # the fallback: a change that arrives within DEADLINE_S was pushed
# The bound on propagation: the inotify event, registration on the engine and this test's own polling.
DEADLINE_S = 3.0
PROMPT = "Question: A train travels 60 miles in 2 hours. What is its speed?\nAnswer:"
V1 = capability_bytes("steer", seed=31, strength=3.0)
V2 = capability_bytes("steer", seed=32, strength=3.0)


def replica(model, registry_dir, name: str, core: str) -> ServerProcess:
    log = registry_dir.parent / f"{name}.log"
    flags = ("--registry-poll-interval", str(POLL_S))
    return tiny_server(model, registry_dir, log, *flags, env={"VLLM_CPU_OMP_THREADS_BIND": core})


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("replicas") / "registry"


@pytest.fixture(scope="module")
def pair(tiny_target_model, registry_dir):
    servers = [replica(tiny_target_model, registry_dir, n, c) for n, c in (("a", "0"), ("b", "1"))]
    with ThreadPoolExecutor(2) as pool:  # both engines start at once, on their own cores
        started = [pool.submit(s.start) for s in servers]
        try:
            for future in started:
                future.result()
        except BaseException:
            for s in servers:
                s.stop()
            raise
    yield servers
    for s in servers:
        s.stop()


def upload(server: ServerProcess, data: bytes, **params) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/capabilities", content=data, params=params, timeout=60)


def complete(server: ServerProcess, **body) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, **body}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)


def steered(server: ServerProcess) -> str | None:
    """The text steered by "steer" on this replica, None while it refuses the name."""
    r = complete(server, capabilities=["steer"])
    if r.status_code == 400 and "unknown capability" in r.json()["error"]["message"]:
        return None
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def wait_for(server: ServerProcess, expected: str | None) -> float:
    """Seconds until `server` steers "steer" to `expected` (None: refuses it); fails past DEADLINE_S."""
    start = time.monotonic()
    while (got := steered(server)) != expected:
        assert time.monotonic() - start < DEADLINE_S, f"{server.url} still gives {got!r}"
        time.sleep(0.05)
    return time.monotonic() - start


def sync_status(server: ServerProcess) -> dict:
    return httpx.get(f"{server.url}/v1/capabilities", timeout=30).json()["registry"]


def listing(server: ServerProcess) -> list[tuple[str, str, str]]:
    data = httpx.get(f"{server.url}/v1/capabilities", timeout=30).json()["data"]
    return [(c["name"], c["sha256"], c["status"]) for c in data]


def metric(server: ServerProcess, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_upload_replace_delete_propagate_between_replicas(pair, registry_dir):
    a, b = pair
    plain = complete(a).json()["choices"][0]["text"]
    assert upload(a, V1).status_code == 201
    on_a = steered(a)  # usable on a when its 201 returns
    assert on_a is not None and on_a != plain
    wait_for(b, on_a)  # same greedy tokens on b
    assert sync_status(b)["generation"] == sync_status(a)["generation"] == 1

    r = upload(b, V2, replace="true")
    assert r.status_code == 201, r.text
    on_b = steered(b)
    assert on_b != on_a
    wait_for(a, on_b)

    assert httpx.delete(f"{a.url}/v1/capabilities/steer", timeout=30).status_code == 200
    wait_for(b, None)
    assert listing(a) == listing(b) == []
    assert not list((registry_dir / "blobs").iterdir())  # nothing names the content any more

    for server in pair:
        assert metric(server, "unlock_engine_capabilities") == 0
    assert metric(b, "unlock_registry_propagation_seconds_count") == 2  # a's upload, a's delete
    assert metric(a, "unlock_registry_propagation_seconds_count") == 1  # b's replace
    status = httpx.get(f"{b.url}/health", timeout=30).json()["registry"]
    assert (status["sync"], status["listening"]) == ("inotify", True)
    assert status["generation"] == 3 and status["lag"] < DEADLINE_S
    assert 0 <= status["propagation"] < DEADLINE_S


def test_a_change_is_offered_while_the_engine_is_busy_and_its_requests_wait_for_it(pair):
    """b's engine core is stopped (SIGSTOP), as in a step that does not end: a's upload is still listed ready
    on b as soon as b reads it, and a request there waits in flight instead of being refused; once the
    engine goes on, the request gets the same steered tokens as on a."""
    a, b = pair
    with ThreadPoolExecutor(1) as pool:
        with engine_stopped(b):
            created = upload(a, V1)
            assert created.status_code == 201, created.text
            sha = created.json()["sha256"]
            start = time.monotonic()
            while listing(b) != [("steer", sha, "ready")]:  # before b's engine has registered it
                assert time.monotonic() - start < DEADLINE_S, listing(b)
                time.sleep(0.05)
            waiting = pool.submit(complete, b, capabilities=["steer"])
            while in_flight(b, "steer") != 1:
                assert time.monotonic() - start < DEADLINE_S and not waiting.done()
                time.sleep(0.05)
        response = waiting.result(timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == steered(a)
    assert httpx.delete(f"{a.url}/v1/capabilities/steer", timeout=30).status_code == 200
    wait_for(b, None)


def test_a_killed_replica_restarts_with_everything(pair, tiny_target_model, registry_dir):
    """Runs last: b dies with SIGKILL (its engine too) and a fresh b starts on the same directory."""
    a, b = pair
    assert upload(a, V1).status_code == 201
    assert upload(b, V2, name="other").status_code == 201
    wait_for(b, steered(a))
    expected = steered(a)
    os.killpg(b.proc.pid, signal.SIGKILL)
    b.proc.wait(timeout=60)
    assert upload(a, V2, name="while-b-was-down").status_code == 201

    restarted = replica(tiny_target_model, registry_dir, "b-restarted", "1").start()
    pair[1] = restarted  # the fixture stops it
    assert listing(restarted) == listing(a)
    assert [n for n, _, status in listing(a) if status == "ready"] == ["other", "steer", "while-b-was-down"]
    assert steered(restarted) == expected
    owners = sorted(p.name for p in (registry_dir / "owners").iterdir())
    assert len(owners) == 2  # the dead b's owner lock was collected; a's and the new b's remain
