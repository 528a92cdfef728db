"""Capability endpoints on the real `unlock-serve` process: lifecycle, persistence across a restart,
every refusal path in the OpenAI error shape, and auth (401 missing key, 403 wrong key)."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_harness import ServerProcess, capability_bytes, tiny_server, with_nan

API_KEY, ADMIN_KEY = "cap-api-key", "cap-admin-key"
MAX_UPLOAD = 16 * 1024
PROMPT = "Question: A train travels 60 miles in 2 hours. What is its speed?\nAnswer:"
API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
STEER = capability_bytes("steer", seed=11, mode="rotate", strength=3.0)
OTHER = capability_bytes("steer", seed=12, mode="rotate", strength=3.0)


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("capabilities") / "registry"


def start_server(model, registry_dir, log_path) -> ServerProcess:
    keys = {"UNLOCK_API_KEY": API_KEY, "UNLOCK_ADMIN_KEY": ADMIN_KEY}
    return tiny_server(model, registry_dir, log_path, "--max-upload-bytes", str(MAX_UPLOAD), env=keys).start()


@pytest.fixture(scope="module")
def server(tiny_target_model, registry_dir):
    proc = start_server(tiny_target_model, registry_dir, registry_dir.parent / "server.log")
    yield proc
    proc.stop()


def upload(server, data: bytes, **params) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/capabilities", content=data, params=params, headers=ADMIN, timeout=60)


def complete(server, **body) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, **body}
    return httpx.post(f"{server.url}/v1/completions", json=body, headers=API, timeout=60)


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def assert_error(response: httpx.Response, status: int, fragment: str, param: str | None = None) -> None:
    """The OpenAI error shape with the exact status, and a message that names the problem."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["code"] == status
    assert fragment in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param


def test_upload_is_used_by_the_very_next_request(server):
    plain = text(complete(server))
    r = upload(server, STEER)
    assert r.status_code == 201, r.text
    cap = r.json()
    assert cap["name"] == "steer" and cap["mode"] == "rotate" and cap["layers"] == [0, 1, 2, 3]
    assert cap["default_strength"] == 3.0 and len(cap["sha256"]) == 64
    assert cap["target"] == {"architecture": "qwen2", "num_layers": 4, "hidden_size": 64, "name": "tiny"}
    assert cap["metadata"]["format"] == "unlock.capability"
    steered = complete(server, capabilities=["steer"])
    assert text(steered) != plain
    assert steered.headers["x-unlock-capabilities"] == "steer@3"


def test_list_show_and_name_override(server):
    r = upload(server, STEER, name="steer-copy")
    assert r.status_code == 201 and r.json()["name"] == "steer-copy"
    names = [c["name"] for c in httpx.get(f"{server.url}/v1/capabilities", headers=API).json()["data"]]
    assert names == ["steer", "steer-copy"]
    shown = httpx.get(f"{server.url}/v1/capabilities/steer-copy", headers=API).json()
    assert shown["sha256"] == upload(server, STEER).json()["sha256"]  # same content under two names
    assert_error(httpx.get(f"{server.url}/v1/capabilities/absent", headers=API), 404, "absent")


def test_same_content_is_idempotent_other_content_conflicts_unless_replace(server):
    assert upload(server, STEER).status_code == 200  # unchanged
    assert_error(upload(server, OTHER), 409, "replace=true", param="name")
    before = text(complete(server, capabilities=["steer"]))
    r = upload(server, OTHER, replace="true")
    assert r.status_code == 201
    assert text(complete(server, capabilities=["steer"])) != before
    assert upload(server, STEER, replace="true").status_code == 201  # back to the first content
    assert text(complete(server, capabilities=["steer"])) == before


def test_delete_refuses_new_requests_at_once(server):
    assert upload(server, STEER, name="doomed").status_code == 201
    r = httpx.delete(f"{server.url}/v1/capabilities/doomed", headers=ADMIN)
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert_error(
        complete(server, capabilities=["doomed"]), 400, "unknown capability 'doomed'", "capabilities"
    )
    assert_error(httpx.get(f"{server.url}/v1/capabilities/doomed", headers=API), 404, "doomed")
    assert_error(httpx.delete(f"{server.url}/v1/capabilities/doomed", headers=ADMIN), 404, "doomed")
    # content still named "steer" stays registered on the workers
    assert text(complete(server, capabilities=["steer"])) != text(complete(server))


def test_delete_while_streaming_defers_unregister_until_the_stream_ends(server):
    data = capability_bytes("streaming", seed=21, strength=3.0)
    sha = upload(server, data).json()["sha256"]
    body = {"model": "tiny+streaming", "prompt": PROMPT, "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=API, timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        assert httpx.delete(f"{server.url}/v1/capabilities/streaming", headers=ADMIN).status_code == 200
        assert_error(complete(server, model="tiny+streaming"), 400, "unknown capability", "capabilities")
        rest = list(lines)
    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
    registered = httpx.get(f"{server.url}/health").json()["plugin"]["workers"][0]["registered"]
    assert sha not in registered


ARTIFACT_REFUSALS = {
    "truncated": (STEER[: len(STEER) // 2], {}, 400, "invalid capability artifact"),
    "nan": (with_nan(STEER), {}, 400, "invalid capability artifact"),
    "wrong hidden size": (capability_bytes("wide", hidden_size=128), {}, 400, "hidden"),
    "wrong layer count": (capability_bytes("deep", num_layers=6), {}, 400, "layers"),
    "not safetensors": (b"hello world", {}, 400, "invalid capability artifact"),
    "oversize": (STEER + b"\0" * MAX_UPLOAD, {}, 413, str(MAX_UPLOAD)),
    "dot-dot name": (STEER, {"name": "../x"}, 400, "invalid capability name"),
    "slash name": (STEER, {"name": "a/b"}, 400, "invalid capability name"),
}


@pytest.mark.parametrize("case", ARTIFACT_REFUSALS, ids=list(ARTIFACT_REFUSALS))
def test_bad_uploads_are_refused_and_change_nothing(server, registry_dir, case):
    data, params, status, fragment = ARTIFACT_REFUSALS[case]
    manifest = (registry_dir / "manifest.json").read_bytes()
    assert_error(upload(server, data, **params), status, fragment)
    assert (registry_dir / "manifest.json").read_bytes() == manifest
    assert list((registry_dir / "tmp").iterdir()) == []
    assert text(complete(server, capabilities=["steer"]))  # a normal request right after still works


REQUEST_REFUSALS = {
    "unknown name": ({"capabilities": ["nope"]}, "unknown capability 'nope'"),
    "unknown in model name": ({"model": "tiny+nope"}, "unknown capability 'nope'"),
    "strength not a number": ({"capabilities": {"steer": "high"}}, "must be a number"),
    "strength too large": ({"capabilities": {"steer": 1e9}}, "within"),
    "strength infinite in model name": ({"model": "tiny+steer@inf"}, "finite"),
    "strength nan in model name": ({"model": "tiny+steer@nan"}, "finite"),
    "strength garbage in model name": ({"model": "tiny+steer@x"}, "must be a number"),
    "boolean strength": ({"capabilities": [{"name": "steer", "strength": True}]}, "must be a number"),
    "wrong base model": ({"model": "other", "capabilities": ["steer"]}, "served model 'tiny'"),
    "wrong base model in name": ({"model": "other+steer"}, "served model 'tiny'"),
    "selected twice": ({"model": "tiny+steer", "capabilities": ["steer"]}, "selected twice"),
    "bad field type": ({"capabilities": "steer"}, "must be a list"),
}


@pytest.mark.parametrize("case", REQUEST_REFUSALS, ids=list(REQUEST_REFUSALS))
@pytest.mark.parametrize("route", ["completions", "chat"])
def test_bad_selections_are_400_with_param_capabilities(server, case, route):
    body, fragment = REQUEST_REFUSALS[case]
    if route == "chat":
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=API, timeout=60)
    else:
        r = complete(server, **body)
    assert_error(r, 400, fragment, "capabilities")
    assert text(complete(server, capabilities=["steer"]))


def test_reserved_vllm_xargs_key_is_refused(server):
    forged = json.dumps([["0" * 64, 1.0, "rotate"]])
    assert_error(complete(server, vllm_xargs={"unlock": forged}), 400, "reserved", "vllm_xargs")
    assert text(complete(server))


AUTH_CASES = {
    "completions": ("POST", "/v1/completions", API_KEY),
    "models": ("GET", "/v1/models", API_KEY),
    "list capabilities": ("GET", "/v1/capabilities", API_KEY),
    "show capability": ("GET", "/v1/capabilities/steer", API_KEY),
    "upload": ("POST", "/v1/capabilities", ADMIN_KEY),
    "delete": ("DELETE", "/v1/capabilities/steer", ADMIN_KEY),
}


@pytest.mark.parametrize("case", AUTH_CASES, ids=list(AUTH_CASES))
def test_missing_key_is_401_wrong_key_is_403(server, case):
    method, path, right_key = AUTH_CASES[case]
    url = f"{server.url}{path}"
    assert_error(httpx.request(method, url, timeout=30), 401, "missing API key")
    wrong = "cap-api-key" if right_key == ADMIN_KEY else "not-the-key"  # the API key cannot write
    assert_error(
        httpx.request(method, url, headers={"Authorization": f"Bearer {wrong}"}, timeout=30), 403, "wrong"
    )
    assert httpx.get(f"{server.url}/health").status_code == 200  # public
    assert text(complete(server))


def test_admin_key_also_opens_inference(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}
    assert httpx.post(f"{server.url}/v1/completions", json=body, headers=ADMIN, timeout=60).status_code == 200


def test_registry_survives_a_restart(server, tiny_target_model, registry_dir):
    """Runs last in this module: stops the module's server and starts a fresh process on the same registry."""
    before_list = httpx.get(f"{server.url}/v1/capabilities", headers=API).json()["data"]
    before = text(complete(server, capabilities=["steer"]))
    assert server.stop() is not None
    restarted = start_server(tiny_target_model, registry_dir, registry_dir.parent / "restarted.log")
    try:
        after_list = httpx.get(f"{restarted.url}/v1/capabilities", headers=API).json()["data"]
        assert [(c["name"], c["sha256"]) for c in after_list] == [
            (c["name"], c["sha256"]) for c in before_list
        ]
        assert text(complete(restarted, capabilities=["steer"])) == before
        models = [m["id"] for m in httpx.get(f"{restarted.url}/v1/models", headers=API).json()["data"]]
        assert "tiny+steer" in models
    finally:
        restarted.stop()
