"""schemathesis against the server's own OpenAPI schema (every route it publishes, bounded examples):
no response is a 5xx, and the server is alive and steering correctly afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from hardening_harness import (
    assert_openai_error,
    assert_registry_consistent,
    complete,
    tiny_server,
    upload,
)
from serve_harness import capability_bytes

FUZZED = capability_bytes("fuzzed", seed=41, strength=3.0)
# Bounded: 10 generated cases per operation (valid and invalid), one worker, a hard time budget (the CI box
# has 2 cores). The coverage phase (thousands of boundary cases) is run by hand, see docs/HARDENING.md.
SCHEMATHESIS_FLAGS = [
    "--checks", "not_a_server_error",
    "--phases", "examples,fuzzing",
    "--max-examples", "10",
    "--seed", "20261127",
    "--workers", "1",
    "--max-time", "150",
    "--request-timeout", "120",
    "--generation-database", "none",
    "--suppress-health-check", "all",
    "--no-color",
    # vLLM's structured-decisions route answers a documented 501 for models without that feature (this one);
    # test_not_implemented_route_says_so checks that answer instead.
    "--exclude-path", "/v1/systemone",
]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("schema-fuzz")


@pytest.fixture(scope="module")
def server(tiny_target_model, workdir):
    # A short context bounds what a request without max_tokens costs (fuzzed bodies rarely set it).
    registry, log = workdir / "registry", workdir / "server.log"
    proc = tiny_server(tiny_target_model, registry, log, "--max-model-len", "96").start()
    assert upload(proc.url, FUZZED).status_code == 201
    yield proc
    proc.stop()


def test_no_server_errors_from_the_openapi_schema(server, workdir):
    before = complete(server.url, capabilities=["fuzzed"])
    assert before.status_code == 200, before.text
    schemathesis = Path(sys.executable).with_name("schemathesis")
    assert schemathesis.exists(), f"{schemathesis} is missing: pip install -e '.[test]'"
    run = subprocess.run(
        [str(schemathesis), "run", f"{server.url}/openapi.json", *SCHEMATHESIS_FLAGS],
        capture_output=True,
        text=True,
        timeout=600,
    )
    (workdir / "schemathesis.txt").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, f"schemathesis found failures:\n{run.stdout[-12000:]}\n{run.stderr[-3000:]}"
    # It really generated cases for every operation the schema publishes (GET and POST /v1/capture included).
    assert "Tested: 28" in run.stdout and " generated, " in run.stdout, run.stdout

    assert server.proc.poll() is None, f"the server died:\n{server.log()[-8000:]}"
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    assert_registry_consistent(workdir / "registry")
    # Fuzzed uploads or deletes may have changed the registry; re-register and compare steering.
    if "fuzzed" not in assert_registry_consistent(workdir / "registry"):
        assert upload(server.url, FUZZED).status_code == 201
    after = complete(server.url, capabilities=["fuzzed"])
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]


def test_not_implemented_route_says_so(server):
    response = httpx.post(f"{server.url}/v1/systemone", json={"questions": {}, "state": None}, timeout=60)
    assert_openai_error(response, 501, "does not support")
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


SMUGGLE_ROUTES = [
    "/v1/completions",
    "/v1/chat/completions",
    "/invocations",
    "/v1/chat/completions/batch",
    "/v1/responses",
    "/v1/messages",
]


@pytest.mark.parametrize("path", SMUGGLE_ROUTES)
def test_wire_selection_cannot_be_smuggled_past_validation(server, path):
    """A hand-made `vllm_xargs.unlock` (here: strength 1e6, far past the limit) is refused on every route
    that would hand it to the engine, not only on the two that apply capabilities."""
    sha = httpx.get(f"{server.url}/v1/capabilities/fuzzed", timeout=30).json()["sha256"]
    wire = json.dumps([[sha, 1e6, "rotate"]])
    body = {"model": "tiny", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "input": "hi",
            "max_tokens": 4, "vllm_xargs": {"unlock": wire}}  # fmt: skip
    assert_openai_error(httpx.post(f"{server.url}{path}", json=body, timeout=60), 400)
    with_field = {k: v for k, v in body.items() if k != "vllm_xargs"} | {"capabilities": ["fuzzed"]}
    if path not in ("/v1/completions", "/v1/chat/completions"):
        refused = httpx.post(f"{server.url}{path}", json=with_field, timeout=60)
        assert_openai_error(refused, 400, "does not apply capabilities")
