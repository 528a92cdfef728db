"""Faults against the real server: SIGKILL during an upload and during generation, then a restart on the same
registry (intact, nothing partial visible); a capability deleted while requests use it; SIGTERM draining.

Requests that must still be running when the fault comes are admitted while the engine core process is
stopped (SIGSTOP), so they stay in flight however fast the machine generates, and finish after SIGCONT.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from hardening_harness import (
    PROMPT,
    assert_openai_error,
    assert_registry_consistent,
    complete,
    tiny_server,
    upload,
)
from serve_harness import capability_bytes, engine_cores, engine_stopped, in_flight

KEEP = capability_bytes("keep", seed=31, strength=3.0)
PARTIAL = capability_bytes("partial", seed=32, strength=3.0)
VICTIM = capability_bytes("victim", seed=33, strength=3.0)
LONG = {"max_tokens": 200, "ignore_eos": True}
DEADLINE_S = 300  # for polls of state that must come; a hang guard, not a timing assertion


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def in_background(fn: Callable[[], object]) -> tuple[threading.Thread, list]:
    """Run `fn` in a thread; its result (or exception) lands in the returned list."""
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as err:  # the caller inspects what happened, a dropped connection included
            out.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def kill_hard(server) -> None:
    """SIGKILL the whole process group: the API process and the engine core, as a power cut would."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=60)


def start_requests(server, name: str, n: int) -> list[tuple[threading.Thread, list]]:
    """`n` requests steered by `name`, each in its own thread, returned once the server counts all `n` in
    flight. Call it with the engine stopped to keep them in flight."""
    client = httpx.Client(base_url=server.url, timeout=DEADLINE_S)
    body = {"model": "tiny", "prompt": PROMPT, "temperature": 0, "capabilities": [name], **LONG}
    runs = [in_background(lambda: client.post("/v1/completions", json=body)) for _ in range(n)]
    wait_for(lambda: in_flight(server, name) == n, f"{n} requests using {name!r} in flight")
    return runs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def server(tiny_target_model, workdir):
    registry, log = workdir / "registry", workdir / "server.log"
    proc = tiny_server(tiny_target_model, registry, log, "--drain-timeout", "120").start()
    assert upload(proc.url, KEEP).status_code == 201
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def steered_before(server) -> str:
    response = complete(server.url, capabilities=["keep"])
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_sigkill_during_upload_leaves_nothing_partial(server, workdir, steered_before):
    registry = workdir / "registry"
    manifest_before = (registry / "manifest.json").read_bytes()
    half_sent, release = threading.Event(), threading.Event()

    def body() -> Iterator[bytes]:
        yield PARTIAL[: len(PARTIAL) // 2]
        half_sent.set()
        release.wait(DEADLINE_S)  # the server dies while it waits for the rest
        yield PARTIAL[len(PARTIAL) // 2 :]

    thread, out = in_background(lambda: upload(server.url, body()))
    half_sent.wait(DEADLINE_S)
    wait_for(lambda: any((registry / "tmp").iterdir()), "the upload to be staged in tmp/")
    kill_hard(server)
    release.set()
    thread.join(DEADLINE_S)
    assert isinstance(out[0], httpx.HTTPError), f"the upload cannot have succeeded: {out[0]!r}"
    assert (registry / "manifest.json").read_bytes() == manifest_before

    server.start()  # same registry directory
    entries = assert_registry_consistent(registry)  # the staged half-upload was cleared at start
    assert sorted(entries) == ["keep"]
    assert_openai_error(complete(server.url, capabilities=["partial"]), 400, "unknown capability")
    after = complete(server.url, capabilities=["keep"])
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == steered_before


def test_sigkill_during_generation_then_restart(server, workdir, steered_before):
    registry = workdir / "registry"
    with engine_stopped(server):
        [(thread, out)] = start_requests(server, "keep", 1)
        kill_hard(server)
    thread.join(DEADLINE_S)
    assert isinstance(out[0], httpx.HTTPError), f"the generation cannot have finished: {out[0]!r}"

    server.start()
    assert sorted(assert_registry_consistent(registry)) == ["keep"]
    listed = httpx.get(f"{server.url}/v1/capabilities", timeout=30).json()["data"]
    assert [(c["name"], c["status"], c["in_flight"]) for c in listed] == [("keep", "ready", 0)]
    after = complete(server.url, capabilities=["keep"])
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == steered_before


def registered_on_workers(server) -> set[str]:
    workers = httpx.get(f"{server.url}/health", timeout=30).json()["plugin"]["workers"]
    return {sha for w in workers for sha in w["registered"]}


def test_delete_while_in_use_finishes_those_requests(server, workdir):
    registry = workdir / "registry"
    created = upload(server.url, VICTIM)
    assert created.status_code == 201, created.text
    sha = created.json()["sha256"]
    reference = complete(server.url, capabilities=["victim"], **LONG)
    assert reference.status_code == 200, reference.text

    with engine_stopped(server):
        runs = start_requests(server, "victim", 3)
        deleted = httpx.delete(f"{server.url}/v1/capabilities/victim", timeout=60)
        assert deleted.status_code == 200, deleted.text
        assert_openai_error(complete(server.url, capabilities=["victim"]), 400, "unknown capability")
        # The server keeps the content on the workers until the last of the three ends.
        wait_for(lambda: "'victim' deleted (3 requests still using it)" in server.log(), "the deferral log")
        assert all(t.is_alive() for t, _ in runs)

    for thread, out in runs:
        thread.join(DEADLINE_S)
        assert isinstance(out[0], httpx.Response) and out[0].status_code == 200, out[0]
        # Still steered by the deleted capability, token for token.
        assert out[0].json()["choices"][0]["text"] == reference.json()["choices"][0]["text"]
    wait_for(lambda: sha not in registered_on_workers(server), "the workers to drop the deleted capability")
    assert not (registry / "blobs" / f"{sha}.safetensors").exists()
    assert sorted(assert_registry_consistent(registry)) == ["keep"]


def test_sigterm_drains_in_flight_and_refuses_new(server, workdir):
    """Last in this module: it stops the server."""
    expected = complete(server.url, capabilities=["keep"], **LONG)
    assert expected.status_code == 200, expected.text
    url = server.url

    def refused() -> bool:
        try:
            httpx.get(f"{url}/v1/models", timeout=5)
        except httpx.ConnectError:
            return True
        return False

    with engine_stopped(server):
        runs = start_requests(server, "keep", 2)
        server.proc.send_signal(signal.SIGTERM)
        wait_for(refused, "new connections to be refused while draining")
        assert all(t.is_alive() for t, _ in runs), "in-flight requests must outlive the refusal"
    for thread, out in runs:
        thread.join(DEADLINE_S)
        assert isinstance(out[0], httpx.Response), f"an in-flight request was cut off: {out[0]!r}"
        assert out[0].status_code == 200, out[0].text
        assert out[0].json()["choices"][0]["text"] == expected.json()["choices"][0]["text"]
    server.proc.wait(timeout=DEADLINE_S)
    assert sorted(assert_registry_consistent(workdir / "registry")) == ["keep"]


def test_a_dead_engine_core_stops_the_server(tiny_target_model, tmp_path):
    """vLLM's rule, which unlock-serve runs its uvicorn under: when the engine core dies, the API process
    exits (non-zero, saying why) instead of answering 500 to every request, so an orchestrator restarts it.
    Its own server: this one is not restarted."""
    proc = tiny_server(tiny_target_model, tmp_path / "registry", tmp_path / "server.log").start()
    try:
        for core in engine_cores(proc):
            core.kill()
        try:
            response = complete(proc.url)
            assert response.status_code >= 500, response.text
        except httpx.HTTPError:
            pass  # the server may already be gone
        assert proc.proc.wait(timeout=DEADLINE_S) != 0
        assert "the vLLM engine died" in proc.log()
    finally:
        proc.stop()
