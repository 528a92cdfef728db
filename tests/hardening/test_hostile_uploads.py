"""A corpus of hostile capability uploads against the real server: each is a 4xx in the OpenAI error shape,
nothing appears outside the registry, the registry stays consistent, and steering still works right after."""

from __future__ import annotations

import httpx
import pytest
from hardening_harness import (
    assert_openai_error,
    assert_registry_consistent,
    complete,
    snapshot,
    tiny_server,
    upload,
)
from hostile_corpus import corpus
from serve_harness import capability_bytes

GOOD = capability_bytes("good", seed=21, strength=3.0)
CORPUS = corpus()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def server(tiny_target_model, workdir):
    proc = tiny_server(tiny_target_model, workdir / "registry", workdir / "server.log").start()
    assert upload(proc.url, GOOD).status_code == 201
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reference(server) -> tuple[str, str]:
    """(unsteered, steered) completions before any hostile upload."""
    plain, steered = complete(server.url), complete(server.url, capabilities=["good"])
    assert plain.status_code == steered.status_code == 200, (plain.text, steered.text)
    texts = plain.json()["choices"][0]["text"], steered.json()["choices"][0]["text"]
    assert texts[0] != texts[1], "the 'good' capability must change the output for this test to mean anything"
    return texts


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_hostile_upload_is_refused_without_a_trace(server, reference, workdir, case):
    registry = workdir / "registry"
    before = snapshot(workdir)
    response = upload(server.url, case.body, **case.params)
    assert_openai_error(response, case.status, case.fragment)
    assert snapshot(workdir) == before, f"files appeared or vanished: {snapshot(workdir) ^ before}"
    entries = assert_registry_consistent(registry)
    assert sorted(entries) == ["good"]
    after = complete(server.url, capabilities=["good"])
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["text"] == reference[1], "steering changed after a refused upload"


def test_nothing_escaped_the_workdir(server, workdir, tmp_path_factory):
    """Names like '../../outside' or '/tmp/outside' never became paths."""
    base = tmp_path_factory.getbasetemp()
    escaped = [p for p in base.rglob("*outside*")] + [p for p in base.parent.glob("outside*")]
    assert not escaped, escaped


def test_server_is_healthy_and_counted_the_rejections(server):
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    rejected = 'unlock_uploads_total{outcome="rejected"}'
    line = next(row for row in metrics.splitlines() if row.startswith(rejected))
    assert float(line.split()[-1]) == len(CORPUS), "every refused upload is counted, 413s and bad names too"
