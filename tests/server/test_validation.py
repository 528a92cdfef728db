"""One validator, through the real `unlock-serve`: inputs that were answered with a 500 or slipped through
(issue 11) get a 400 naming the problem, what is accepted applies with finite results, and the steering
operators' HTTP surface: positions per request, a combined capability served equal to the same selection
made per request."""

from __future__ import annotations

import math

import httpx
import pytest
import torch
from serve_harness import tiny_server

from unlock import Capability, TargetInfo
from unlock.artifacts import serialize
from unlock.combine import combine

pytestmark = pytest.mark.engine  # starts a real unlock-serve (tests/engine_guard.py)

PROMPT = "Question: A train travels 60 miles in 2 hours. What is its speed?\nAnswer:"
TINY = TargetInfo("qwen2", 4, 64, "tiny")


def artifact(name, directions, mode="add", layers=None, strength=0.5, **meta) -> Capability:
    layers = list(range(len(directions))) if layers is None else layers
    return Capability.from_directions(name, directions, layers, mode, strength, TINY, meta or None)


def random_directions(seed, count=4):
    return torch.randn(count, 64, generator=torch.Generator().manual_seed(seed))  # [layers, hidden]


@pytest.fixture(scope="module")
def server(tiny_target_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    proc = tiny_server(tiny_target_model, root / "registry", root / "server.log").start()
    yield proc
    proc.stop()


def upload(server, data: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/capabilities", content=data, timeout=120)


def complete(server, **body) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 1, **body}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)


def assert_400(response: httpx.Response, fragment: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and fragment in error["message"], error


def with_directions(name: str, directions: torch.Tensor, mode: str = "add") -> bytes:
    """A file the library would refuse to build (zero rows): a valid one's metadata with other tensors."""
    valid = artifact(name, random_directions(0, len(directions)), mode=mode)
    return serialize({"directions": directions}, valid.metadata)


def one_zero_row() -> torch.Tensor:
    directions = random_directions(1)
    directions[2] = 0
    return directions


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (lambda: with_directions("zero-row", one_zero_row()), "layer(s) [2] is zero"),
        (lambda: with_directions("all-zero", torch.zeros(4, 64)), "every target direction is zero"),
        (
            lambda: with_directions("all-zero-rot", torch.zeros(4, 64), "rotate"),
            "every target direction is zero",
        ),
        (lambda: artifact("loud", random_directions(2), strength=1e12).to_bytes(), "default_strength 1e+12"),
        (lambda: artifact("huge", torch.full((4, 64), 3e38)).to_bytes(), "would steer by up to 3e+39"),
    ],
)
def test_artifacts_that_were_500s_or_slipped_through_are_400s(server, bad, fragment):
    """An `add` artifact with a zero row, an all-zero one, a default strength of 1e12, directions that
    overflow once scaled: refused with the validator's reason, and the registry is unchanged."""
    assert_400(upload(server, bad()), fragment)
    listed = httpx.get(f"{server.url}/v1/capabilities", timeout=30).json()["data"]
    assert not [c for c in listed if c["name"] in ("zero-row", "all-zero", "all-zero-rot", "loud", "huge")]


@pytest.mark.parametrize("depth", [100_000, 990])
def test_deeply_nested_capabilities_field_is_a_400(server, depth):
    body = (
        '{"model": "tiny", "prompt": "hi", "max_tokens": 1, "capabilities": '
        + "[" * depth
        + "]" * depth
        + "}"
    )
    response = httpx.post(
        f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == 400


def test_what_is_accepted_applies_with_finite_results(server):
    """At the limits: entries of 1e5 at strength 10 reach 1e6, the largest value accepted."""
    edge = torch.zeros(4, 64)
    edge[:, 0] = 1e5
    r = upload(server, artifact("edge", edge, strength=10.0).to_bytes())
    assert r.status_code == 201, r.text
    for selection in (["edge"], {"edge": -10}, [{"name": "edge", "strength": 10, "positions": "generated"}]):
        response = complete(server, capabilities=selection)
        assert response.status_code == 200, response.text
        logprobs = response.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert logprobs and all(math.isfinite(x) for x in logprobs), logprobs


def test_positions_are_chosen_per_request(server):
    r = upload(server, artifact("gen", random_directions(3) * 4, strength=1.0).to_bytes())
    assert r.status_code == 201, r.text
    default = complete(server, capabilities=["gen"])  # add: every token
    generated = complete(server, capabilities=[{"name": "gen", "positions": "generated"}])
    assert default.headers["x-unlock-capabilities"] == "gen@1"
    assert generated.headers["x-unlock-capabilities"] == "gen@1:generated"
    plain = complete(server)
    texts = [x.json()["choices"][0]["text"] for x in (default, generated, plain)]
    assert len(set(texts)) == 3, texts
    # The first token is predicted from the prompt alone, which `generated` leaves unedited.
    first = [x.json()["choices"][0]["logprobs"]["token_logprobs"][0] for x in (generated, plain)]
    assert first[0] == pytest.approx(first[1], abs=1e-5)
    by_name = complete(server, model="tiny+gen:generated")  # the model-name form of the same selection
    assert by_name.headers["x-unlock-capabilities"] == "gen@1:generated"
    assert by_name.json()["choices"][0]["text"] == texts[1]
    assert_400(
        complete(server, capabilities=[{"name": "gen", "positions": "middle"}]),
        "positions of capability 'gen'",
    )
    many = [{"name": f"cap{i}"} for i in range(9)]
    assert_400(complete(server, capabilities=many), "at most 8")


def test_a_combined_capability_served_equals_the_selection_per_request(server):
    a = artifact("rotA", random_directions(4, 3), mode="rotate", layers=[0, 1, 2], strength=1.0)
    b = artifact("rotB", random_directions(5, 2), mode="rotate", layers=[2, 3], strength=1.0)
    blend = combine([(0.5, a), (-1.0, b)], "blend")
    for cap in (a, b, blend):
        r = upload(server, cap.to_bytes())
        assert r.status_code == 201, r.text
    provenance = r.json()["metadata"]["combined_from"]  # the registry shows where it came from
    assert a.sha256 in provenance and b.sha256 in provenance
    served = complete(server, capabilities={"blend": 2.0})
    per_request = complete(server, capabilities={"rotA": 1.0, "rotB": -2.0})
    plain = complete(server)
    got, want = (x.json()["choices"][0] for x in (served, per_request))
    assert got["text"] == want["text"] != plain.json()["choices"][0]["text"]
    worst = max(
        abs(x - y)
        for x, y in zip(got["logprobs"]["token_logprobs"], want["logprobs"]["token_logprobs"], strict=True)
    )
    assert worst < 1e-4, worst
