"""Auth in process over a fake engine (fast tier): the API key on every route but the public ones, the
admin key declared by the routes that change the registry, in every key configuration."""

from __future__ import annotations

import pytest
from fake_engine import client, settings, unlock_app
from fastapi import Depends
from fastapi.routing import APIRoute
from serve_harness import capability_bytes
from starlette.testclient import TestClient
from unlock_server.auth import require_admin

API_KEY, ADMIN_KEY = "fast-api-key", "fast-admin-key"
STEER = capability_bytes("steer", seed=11)
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 2}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and fragment in error["message"], error


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    config = settings(tmp_path_factory.mktemp("auth"), api_key=API_KEY, admin_key=ADMIN_KEY)
    with client(config) as test_client:
        assert (
            test_client.post("/v1/capabilities", content=STEER, headers=bearer(ADMIN_KEY)).status_code == 201
        )
        yield test_client


CASES = {
    "completions": ("POST", "/v1/completions", API_KEY),
    "chat": ("POST", "/v1/chat/completions", API_KEY),
    "a route vLLM may add": ("POST", "/v1/some_future_generation", API_KEY),
    "models": ("GET", "/v1/models", API_KEY),
    "list capabilities": ("GET", "/v1/capabilities", API_KEY),
    "show capability": ("GET", "/v1/capabilities/steer", API_KEY),
    "upload": ("POST", "/v1/capabilities", ADMIN_KEY),
    "delete": ("DELETE", "/v1/capabilities/absent", ADMIN_KEY),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_missing_key_is_401_wrong_key_is_403(api, case):
    method, path, _ = CASES[case]
    body = {"json": COMPLETION} if method == "POST" and "capabilities" not in path else {}
    assert_error(api.request(method, path, **body), 401, "missing API key")
    assert_error(api.request(method, path, headers=bearer("not-a-key"), **body), 403, "wrong API key")


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2] == ADMIN_KEY])
def test_the_api_key_cannot_write(api, case):
    method, path, _ = CASES[case]
    assert_error(api.request(method, path, headers=bearer(API_KEY), content=STEER), 403, "wrong admin key")


def test_right_keys_open_their_routes_and_the_admin_key_opens_all(api):
    for key in (API_KEY, ADMIN_KEY):
        assert api.post("/v1/completions", json=COMPLETION, headers=bearer(key)).status_code == 200
        assert api.get("/v1/capabilities/steer", headers=bearer(key)).status_code == 200
    assert api.post("/v1/capabilities", content=STEER, headers={"x-api-key": ADMIN_KEY}).status_code == 200
    assert api.delete("/v1/capabilities/absent", headers=bearer(ADMIN_KEY)).status_code == 404


@pytest.mark.parametrize("path", ["/health", "/metrics", "/playground", "/playground/playground.js"])
def test_public_routes_need_no_key(api, path):
    assert api.get(path).status_code == 200


def test_only_an_admin_key_leaves_inference_open_and_guards_writes(tmp_path):
    with client(settings(tmp_path, admin_key=ADMIN_KEY)) as api:
        assert api.post("/v1/completions", json=COMPLETION).status_code == 200
        assert api.get("/v1/capabilities").status_code == 200
        assert_error(api.post("/v1/capabilities", content=STEER), 401, "missing admin key")
        assert_error(api.post("/v1/capabilities", content=STEER, headers=bearer("x")), 403, "wrong admin key")
        assert_error(api.delete("/v1/capabilities/steer", headers=bearer("x")), 403, "wrong admin key")
        assert api.post("/v1/capabilities", content=STEER, headers=bearer(ADMIN_KEY)).status_code == 201


def test_only_an_api_key_also_guards_writes(tmp_path):
    with client(settings(tmp_path, api_key=API_KEY)) as api:
        assert_error(api.post("/v1/capabilities", content=STEER), 401, "missing API key")
        assert api.post("/v1/capabilities", content=STEER, headers=bearer(API_KEY)).status_code == 201


def test_no_keys_open_every_route(tmp_path):
    with client(settings(tmp_path)) as api:
        assert api.post("/v1/capabilities", content=STEER).status_code == 201
        assert api.delete("/v1/capabilities/steer").status_code == 200


def test_every_registry_write_route_declares_the_admin_dependency(tmp_path):
    app = unlock_app(settings(tmp_path))
    writes = [
        r
        for r in app.routes
        if isinstance(r, APIRoute) and r.path.startswith("/v1/capabilities") and r.methods - {"GET", "HEAD"}
    ]
    assert {(r.path, m) for r in writes for m in r.methods} == {
        ("/v1/capabilities", "POST"),
        ("/v1/capabilities/{name}", "DELETE"),
    }
    for route in writes:
        assert require_admin in [d.call for d in route.dependant.dependencies], route.path


def test_admin_authorization_follows_the_route_not_its_path(tmp_path):
    """A write route at any path is guarded by declaring the dependency; no path prefix is involved."""
    app = unlock_app(settings(tmp_path, api_key=API_KEY, admin_key=ADMIN_KEY))

    @app.post("/elsewhere/reload", dependencies=[Depends(require_admin)])
    async def reload() -> dict:
        return {"ok": True}

    with TestClient(app) as api:
        assert_error(api.post("/elsewhere/reload", headers=bearer(API_KEY)), 403, "wrong admin key")
        assert api.post("/elsewhere/reload", headers=bearer(ADMIN_KEY)).json() == {"ok": True}
