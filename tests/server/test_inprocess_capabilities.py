"""Capability endpoints, the service and the registry in process over a fake engine (fast tier): lifecycle,
the per-layer summary, refusals that change nothing, /v1/models and /health, a delete while a stream runs,
and a restart on the same directory. tests/server/test_capabilities.py runs the same paths on a real
engine."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from fake_engine import client, settings, unlock_app
from serve_harness import capability_bytes, with_nan
from unlock_server.engine import EXTRA_ARGS_KEY

from unlock import Capability, TargetInfo

MAX_UPLOAD = 16 * 1024
STEER = capability_bytes("steer", seed=11, strength=3.0)
OTHER = capability_bytes("steer", seed=12, strength=3.0)


def assert_error(response, status: int, fragment: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and fragment in error["message"], error
    assert param is None or error["param"] == param, error


def steered_sha(api, name: str) -> str:
    """The sha256 the wire selection of a request naming `name` carries."""
    r = api.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "capabilities": [name]})
    assert r.status_code == 200, r.text
    return json.loads(r.json()["received"]["vllm_xargs"][EXTRA_ARGS_KEY])[0][0]


@pytest.fixture
def config(tmp_path):
    return settings(tmp_path, max_upload_bytes=MAX_UPLOAD)


def test_upload_is_registered_listed_shown_and_used(config):
    with client(config) as api:
        r = api.post("/v1/capabilities", content=STEER)
        assert r.status_code == 201, r.text
        cap = r.json()
        assert cap["name"] == "steer" and cap["layers"] == [0, 1, 2, 3] and cap["default_strength"] == 3.0
        assert cap["sha256"] in api.app.state.unlock_service.workers.registered  # before the 201
        assert steered_sha(api, "steer") == cap["sha256"]
        listed = api.get("/v1/capabilities").json()
        assert [c["name"] for c in listed["data"]] == ["steer"]
        assert listed["max_strength"] == 10.0  # the limit on |strength|, for clients such as the playground
        shown = api.get("/v1/capabilities/steer").json()
        norms = Capability.from_bytes(STEER).target_directions().norm(dim=-1).tolist()
        assert [row["layer"] for row in shown["per_layer"]] == [0, 1, 2, 3]
        assert [row["norm"] for row in shown["per_layer"]] == pytest.approx(norms, rel=1e-6)
        assert {row["alignment_error"] for row in shown["per_layer"]} == {None}
        assert_error(api.get("/v1/capabilities/absent"), 404, "no capability named 'absent'")


def test_per_layer_summary_carries_source_layers_and_held_out_errors(config):
    directions = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))  # [layers, hidden]
    meta = {"alignment_errors": json.dumps([0.25, 0.5]), "source_layers": json.dumps([3, 7])}
    data = Capability.from_directions(
        "mapped", directions, [1, 3], "add", 0.5, TargetInfo("qwen2", 4, 64, "tiny"), meta
    ).to_bytes()
    with client(config) as api:
        assert api.post("/v1/capabilities", content=data).status_code == 201
        rows = api.get("/v1/capabilities/mapped").json()["per_layer"]
    assert [(r["layer"], r["source_layer"], r["alignment_error"]) for r in rows] == [
        (1, 3, 0.25),
        (3, 7, 0.5),
    ]
    assert [r["norm"] for r in rows] == pytest.approx(directions.norm(dim=-1).tolist(), rel=1e-6)


def test_same_content_is_a_no_op_other_content_conflicts_unless_replaced(config):
    with client(config) as api:
        first = api.post("/v1/capabilities", content=STEER).json()["sha256"]
        assert api.post("/v1/capabilities", content=STEER).status_code == 200
        assert_error(api.post("/v1/capabilities", content=OTHER), 409, "replace=true", "name")
        replaced = api.post("/v1/capabilities", content=OTHER, params={"replace": "true"})
        assert replaced.status_code == 201 and steered_sha(api, "steer") == replaced.json()["sha256"] != first
        assert api.app.state.unlock_service.workers.registered == {replaced.json()["sha256"]}


REFUSALS = {
    "truncated": (STEER[: len(STEER) // 2], {}, 400, "invalid capability artifact"),
    "nan": (with_nan(STEER), {}, 400, "invalid capability artifact"),
    "wrong hidden size": (capability_bytes("wide", hidden_size=128), {}, 400, "hidden"),
    "wrong layer count": (capability_bytes("deep", num_layers=6), {}, 400, "layers"),
    "oversize": (STEER + b"\0" * MAX_UPLOAD, {}, 413, str(MAX_UPLOAD)),
    "dot-dot name": (STEER, {"name": "../x"}, 400, "invalid capability name"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_bad_uploads_are_refused_and_change_nothing(config, case):
    data, params, status, fragment = REFUSALS[case]
    with client(config) as api:
        assert api.post("/v1/capabilities", content=STEER).status_code == 201
        manifest = (config.registry_dir / "manifest.json").read_bytes()
        assert_error(api.post("/v1/capabilities", content=data, params=params), status, fragment)
        assert (config.registry_dir / "manifest.json").read_bytes() == manifest
        assert list((config.registry_dir / "tmp").iterdir()) == []
        assert [c["name"] for c in api.get("/v1/capabilities").json()["data"]] == ["steer"]


def test_models_health_and_metrics_follow_the_registry(config):
    with client(config) as api:
        api.post("/v1/capabilities", content=STEER)
        models = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
        assert models["tiny+steer"]["parent"] == "tiny" and models["tiny"]["parent"] is None
        health = api.get("/health").json()
        assert health["status"] == "ok" and health["capabilities"] == 1
        assert health["plugin"]["wrapped_layers"] == 4
        registry = health["registry"]  # a local directory: changes by others arrive through inotify
        assert (registry["sync"], registry["listening"], registry["sync_note"]) == ("inotify", True, None)
        api.delete("/v1/capabilities/steer")
        assert "tiny+steer" not in {m["id"] for m in api.get("/v1/models").json()["data"]}


def test_a_delete_while_a_stream_runs_refuses_new_requests_and_unregisters_when_it_ends(config):
    async def scenario() -> None:
        gate = asyncio.Event()
        app = unlock_app(config, gate)
        service = app.state.unlock_service
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://t") as api,
        ):
            sha = (await api.post("/v1/capabilities", content=STEER)).json()["sha256"]
            body = {"model": "tiny+steer", "prompt": "hi", "stream": True}
            stream = asyncio.create_task(api.post("/v1/completions", json=body))
            while service._in_flight[sha] == 0:  # the stream has been admitted and sent its first event
                await asyncio.sleep(0.01)
            assert (await api.get("/v1/capabilities/steer")).json()["in_flight"] == 1
            assert (await api.delete("/v1/capabilities/steer")).status_code == 200
            assert_error(await api.post("/v1/completions", json=body), 400, "unknown capability 'steer'")
            assert sha in service.workers.registered  # the running stream still steers with it
            gate.set()
            done = await stream
            assert done.status_code == 200 and done.headers["x-unlock-capabilities"] == "steer@3"
            assert done.text.endswith("data: [DONE]\n\n")
            for _ in range(500):
                if sha not in service.workers.registered:
                    break
                await asyncio.sleep(0.01)
            assert sha not in service.workers.registered

    asyncio.run(scenario())


def test_the_registry_survives_a_restart_on_the_same_directory(config):
    with client(config) as api:
        api.post("/v1/capabilities", content=STEER)
        api.post("/v1/capabilities", content=STEER, params={"name": "copy"})
        before = api.get("/v1/capabilities").json()["data"]
    with client(config) as api:
        after = api.get("/v1/capabilities").json()["data"]
        assert [(c["name"], c["sha256"]) for c in after] == [(c["name"], c["sha256"]) for c in before]
        assert steered_sha(api, "copy") == before[0]["sha256"]
        assert api.app.state.unlock_service.workers.registered == {before[0]["sha256"]}
