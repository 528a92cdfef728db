"""Selection and the route guard, in process over a fake engine (fast tier): what each route hands vLLM,
and every refusal. The guard is an allowlist: only the two steering routes take a selection."""

from __future__ import annotations

import json

import pytest
from fake_engine import FORM_ROUTE, OTHER_JSON_ROUTES, client, settings
from serve_harness import capability_bytes
from unlock_server.engine import EXTRA_ARGS_KEY, encode_selection

STEER = capability_bytes("steer", seed=11, mode="rotate", strength=3.0)
BOOST = capability_bytes("boost", seed=12, mode="add", strength=2.0, layers=[1, 2])
STEERING_ROUTES = ("/v1/completions", "/v1/chat/completions")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with client(settings(tmp_path_factory.mktemp("selection"))) as test_client:
        for data in (STEER, BOOST):
            assert test_client.post("/v1/capabilities", content=data).status_code == 201
        yield test_client


@pytest.fixture(scope="module")
def shas(api) -> dict[str, str]:
    return {c["name"]: c["sha256"] for c in api.get("/v1/capabilities").json()["data"]}


def request_body(route: str, **extra) -> dict:
    if route == "/v1/chat/completions":
        return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    return {"model": "tiny", "prompt": "hi", "max_tokens": 4, **extra}


def assert_error(response, status: int, fragment: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and fragment in error["message"], error
    assert param is None or error["param"] == param, error


SELECTIONS = {
    "names": ({"capabilities": ["steer"]}, [("steer", 3.0)], "steer@3"),
    "mapping": ({"capabilities": {"steer": 0.5, "boost": -1}}, [("steer", 0.5), ("boost", -1.0)], None),
    "objects": (
        {"capabilities": [{"name": "boost"}, {"name": "steer", "strength": 0.25}]},
        [("boost", 2.0), ("steer", 0.25)],
        "boost@2,steer@0.25",
    ),  # fmt: skip
    "model name": ({"model": "tiny+steer@0.15+boost"}, [("steer", 0.15), ("boost", 2.0)], None),
    "both": ({"model": "tiny+boost", "capabilities": {"steer": 1}}, [("steer", 1.0), ("boost", 2.0)], None),
}


@pytest.mark.parametrize("case", SELECTIONS, ids=list(SELECTIONS))
@pytest.mark.parametrize("route", STEERING_ROUTES)
def test_selection_becomes_the_wire_selection_vllm_receives(api, shas, route, case):
    extra, chosen, header = SELECTIONS[case]
    r = api.post(route, json=request_body(route, **extra))
    assert r.status_code == 200, r.text
    received = r.json()["received"]
    modes = {"steer": "rotate", "boost": "add"}
    want = encode_selection(sorted((shas[name], s, modes[name]) for name, s in chosen))
    assert received["vllm_xargs"] == {EXTRA_ARGS_KEY: want}
    assert received["model"] == "tiny" and "capabilities" not in received
    if header is not None:
        assert r.headers["x-unlock-capabilities"] == header


def test_a_model_name_carries_positions_in_the_form_of_the_response_header(api, shas):
    r = api.post(
        "/v1/completions", json=request_body("/v1/completions", model="tiny+steer@0.5:all+boost:generated")
    )
    assert r.status_code == 200, r.text
    want = encode_selection([(shas["steer"], 0.5, "rotate", "all"), (shas["boost"], 2.0, "add", "generated")])
    assert r.json()["received"]["vllm_xargs"] == {EXTRA_ARGS_KEY: want}
    header = r.headers["x-unlock-capabilities"]
    assert sorted(header.split(",")) == ["boost@2:generated", "steer@0.5:all"]


@pytest.mark.parametrize("route", STEERING_ROUTES)
def test_unsteered_request_reaches_vllm_as_sent(api, route):
    sent = request_body(route, vllm_xargs={"other_plugin": 1}, temperature=0)
    r = api.post(route, json=sent)
    assert r.status_code == 200 and r.json()["received"] == sent
    assert "x-unlock-capabilities" not in r.headers


def test_other_vllm_xargs_survive_the_rewrite(api, shas):
    r = api.post(
        "/v1/completions", json=request_body("/v1/completions", vllm_xargs={"x": "y"}, model="tiny+steer")
    )
    assert set(r.json()["received"]["vllm_xargs"]) == {"x", EXTRA_ARGS_KEY}


REFUSALS = {
    "unknown name": ({"capabilities": ["nope"]}, "unknown capability 'nope'"),
    "unknown in model name": ({"model": "tiny+nope"}, "unknown capability 'nope'"),
    "strength not a number": ({"capabilities": {"steer": "high"}}, "must be a number"),
    "strength too large": ({"capabilities": {"steer": 1e9}}, "within"),
    "strength infinite in model name": ({"model": "tiny+steer@inf"}, "finite"),
    "strength nan in model name": ({"model": "tiny+steer@nan"}, "finite"),
    "strength garbage in model name": ({"model": "tiny+steer@x"}, "must be a number"),
    "positions unknown in model name": ({"model": "tiny+steer@1:middle"}, "positions of capability 'steer'"),
    "empty name in model name": ({"model": "tiny+:all"}, "empty capability name"),
    "empty positions in model name": ({"model": "tiny+steer@1:"}, "empty positions"),
    "boolean strength": ({"capabilities": [{"name": "steer", "strength": True}]}, "must be a number"),
    "unknown key": ({"capabilities": [{"name": "steer", "weight": 1}]}, "unknown keys"),
    "bad item": ({"capabilities": [3]}, "must be a name"),
    "wrong base model": ({"model": "other", "capabilities": ["steer"]}, "served model 'tiny'"),
    "wrong base model in name": ({"model": "other+steer"}, "served model 'tiny'"),
    "selected twice": ({"model": "tiny+steer", "capabilities": ["steer"]}, "selected twice"),
    "bad field type": ({"capabilities": "steer"}, "must be a list"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
@pytest.mark.parametrize("route", STEERING_ROUTES)
def test_bad_selections_are_400_with_param_capabilities(api, route, case):
    extra, fragment = REFUSALS[case]
    assert_error(api.post(route, json=request_body(route, **extra)), 400, fragment, "capabilities")


@pytest.mark.parametrize("as_string", [False, True], ids=["object", "json string"])
@pytest.mark.parametrize("route", STEERING_ROUTES)
def test_hand_written_wire_selection_is_refused_on_steering_routes(api, shas, route, as_string):
    xargs = {EXTRA_ARGS_KEY: json.dumps([[shas["steer"], 1e6, "rotate"]])}
    r = api.post(route, json=request_body(route, vllm_xargs=json.dumps(xargs) if as_string else xargs))
    assert_error(r, 400, "is reserved", "vllm_xargs")


@pytest.mark.parametrize("route", OTHER_JSON_ROUTES)
def test_other_routes_refuse_a_selection_whatever_their_path(api, shas, route):
    """The allowlist: vLLM's non-steering routes, and one no release has yet, refuse both forms."""
    wire = {EXTRA_ARGS_KEY: json.dumps([[shas["steer"], 1e6, "rotate"]])}
    plain = {"model": "tiny", "input": "hi", "prompt": "hi"}
    assert_error(
        api.post(route, json={**plain, "capabilities": ["steer"]}), 400, "does not apply", "capabilities"
    )
    assert_error(api.post(route, json={**plain, "vllm_xargs": wire}), 400, "is reserved", "vllm_xargs")
    assert_error(api.post(route, json={**plain, "vllm_xargs": json.dumps(wire)}), 400, "is reserved")
    # A route that parses its body itself cannot be reached by mislabelling the JSON either.
    mislabelled = api.post(
        route, content=json.dumps({**plain, "vllm_xargs": wire}), headers={"content-type": "text/plain"}
    )
    assert_error(mislabelled, 400, "is reserved")
    passed = api.post(route, json={**plain, "vllm_xargs": {"other_plugin": 1}})
    assert passed.status_code == 200 and passed.json()["received"] == {
        **plain,
        "vllm_xargs": {"other_plugin": 1},
    }


def test_form_routes_refuse_a_selection_in_a_form_field(api, shas):
    wire = json.dumps({EXTRA_ARGS_KEY: json.dumps([[shas["steer"], 1e6, "rotate"]])})
    assert_error(api.post(FORM_ROUTE, data={"model": "tiny", "vllm_xargs": wire}), 400, "is reserved")
    assert_error(api.post(FORM_ROUTE, data={"capabilities": "steer"}), 400, "does not apply")
    multipart = api.post(FORM_ROUTE, data={"vllm_xargs": wire}, files={"file": ("a.wav", b"RIFF....")})
    assert_error(multipart, 400, "is reserved")
    passed = api.post(
        FORM_ROUTE, data={"model": "tiny", "vllm_xargs": '{"x": 1}'}, files={"file": ("a.wav", b"RIFF")}
    )
    assert passed.status_code == 200 and passed.json()["received"] == {
        "model": "tiny",
        "vllm_xargs": '{"x": 1}',
    }


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/some_future_generation"])
def test_deeply_nested_body_is_a_400_not_a_crash(api, route):
    body = '{"model": "tiny", "prompt": "hi", "capabilities": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = api.post(route, content=body, headers={"content-type": "application/json"})
    assert_error(r, 400, "nested too deeply")


def test_the_upload_route_is_not_read_as_a_request(api):
    """Its body is an artifact streamed to the registry: even one that looks like a selection reaches the
    upload handler, which judges it as an artifact."""
    r = api.post("/v1/capabilities", content=json.dumps({"capabilities": ["steer"]}).encode())
    assert_error(r, 400, "invalid capability artifact")
