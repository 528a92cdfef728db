"""`unlock-serve --data-parallel-size 2` (vLLM's internal load balancing, two engine cores, each on its own
CPU core): an upload registers on the workers of both engines before its 201, /health lists every worker
with its engine, and requests that vLLM spreads over both engines are all steered, identically.
(AsyncLLM.collective_rpc alone would reach engine 0 only: engine 1's requests would run unsteered.)"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_harness import capability_bytes, tiny_server

PROMPT = "Question: A train travels 60 miles in 2 hours. What is its speed?\nAnswer:"
REQUESTS = 8  # the balancer sends these to both engines


@pytest.fixture(scope="module")
def server(tiny_target_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    proc = tiny_server(
        tiny_target_model,
        tmp / "registry",
        tmp / "server.log",
        "--data-parallel-size",
        "2",
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},  # one core per engine (both would bind core 0)
    )
    yield proc.start()
    proc.stop()


def complete(server, **extra) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)


def workers(server) -> list[dict]:
    return httpx.get(f"{server.url}/health", timeout=30).json()["plugin"]["workers"]


def test_upload_reaches_both_engines_and_every_request_is_steered(server):
    assert sorted(w["dp_rank"] for w in workers(server)) == [0, 1]
    upload = httpx.post(
        f"{server.url}/v1/capabilities", content=capability_bytes("steer", seed=5, strength=3.0), timeout=120
    )
    assert upload.status_code == 201, upload.text
    sha = upload.json()["sha256"]
    assert all(sha in w["registered"] for w in workers(server)), workers(server)

    plain = complete(server).json()["choices"][0]["text"]
    with ThreadPoolExecutor(REQUESTS) as pool:
        replies = list(pool.map(lambda _: complete(server, capabilities=["steer"]), range(REQUESTS)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    texts = {r.json()["choices"][0]["text"] for r in replies}
    assert len(texts) == 1 and plain not in texts, (plain, texts)
    steered = {w["dp_rank"]: w["steered_tokens"] for w in workers(server)}
    assert all(n > 0 for n in steered.values()), f"an engine served no steered token: {steered}"
