"""OpenAI endpoints through the real `unlock-serve` process: with and without capabilities, streamed or not,
selected by `extra_body` or by model name; steered tokens equal the HF reference (`unlock.steering`)."""

from __future__ import annotations

import httpx
import openai
import pytest
from serve_harness import capability_bytes, tiny_server

API_KEY, ADMIN_KEY = "test-api-key", "test-admin-key"
PROMPT = "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?\nAnswer:"
MAX_TOKENS = 12
COT_STRENGTH = 3.0  # rotate: large enough to flip greedy choices of the peaked tiny model


@pytest.fixture(scope="module")
def server(tiny_target_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inference")
    keys = ("--api-key", API_KEY, "--admin-key", ADMIN_KEY)
    proc = tiny_server(tiny_target_model, tmp / "registry", tmp / "server.log", *keys).start()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for data in (COT_ARTIFACT, BOOST_ARTIFACT):
        r = httpx.post(f"{proc.url}/v1/capabilities", content=data, headers=admin, timeout=60)
        assert r.status_code == 201, r.text
    yield proc
    proc.stop()


COT_ARTIFACT = capability_bytes("cot", seed=1, mode="rotate", strength=COT_STRENGTH)
BOOST_ARTIFACT = capability_bytes("boost", seed=2, mode="add", strength=2.0, layers=[1, 2])


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def oracle(tiny_target_model):
    """Greedy HF generation with the same steering equations: token ids per selection."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlock import Capability
    from unlock.steering import steered_generate

    model = AutoModelForCausalLM.from_pretrained(tiny_target_model, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_target_model)
    caps = {"cot": Capability.from_bytes(COT_ARTIFACT), "boost": Capability.from_bytes(BOOST_ARTIFACT)}

    def generate(selection: dict[str, float]) -> list[int]:
        chosen = [(caps[name], strength) for name, strength in selection.items()]
        return steered_generate(model, tokenizer, [PROMPT], [chosen], MAX_TOKENS)[0].token_ids

    return generate


def complete(client: openai.OpenAI, model: str = "tiny", **extra) -> tuple[list[int], httpx.Headers]:
    raw = client.completions.with_raw_response.create(
        model=model,
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True, **extra},
    )
    return list(raw.parse().choices[0].token_ids), raw.headers


def test_steered_completion_equals_hf_reference_and_differs_from_unsteered(client, oracle):
    plain, plain_headers = complete(client)
    steered, headers = complete(client, capabilities={"cot": COT_STRENGTH})
    assert plain == oracle({})
    assert steered == oracle({"cot": COT_STRENGTH})
    assert steered != plain
    assert headers["x-unlock-capabilities"] == f"cot@{COT_STRENGTH:g}"
    assert "x-unlock-capabilities" not in plain_headers


def test_two_capabilities_of_both_modes_equal_hf_reference(client, oracle):
    both, headers = complete(client, capabilities=[{"name": "cot", "strength": 0.3}, {"name": "boost"}])
    assert both == oracle({"cot": 0.3, "boost": 2.0})
    assert headers["x-unlock-capabilities"] == "cot@0.3,boost@2"


def test_model_name_selection_equals_body_selection(client):
    by_body, _ = complete(client, capabilities=["cot"])  # default strength
    by_name, headers = complete(client, model="tiny+cot")
    by_name_explicit, _ = complete(client, model=f"tiny+cot@{COT_STRENGTH}")
    assert by_body == by_name == by_name_explicit
    assert headers["x-unlock-capabilities"] == f"cot@{COT_STRENGTH:g}"


def test_strength_zero_equals_unsteered(client):
    assert complete(client, capabilities={"cot": 0.0})[0] == complete(client)[0]


@pytest.mark.parametrize("capabilities", [None, ["cot"]])
def test_completion_stream_equals_non_stream(client, capabilities):
    extra = {"capabilities": capabilities} if capabilities else {}
    text = (
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, extra_body=extra
        )
        .choices[0]
        .text
    )
    stream = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        extra_body=extra,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def chat(client, model="tiny", **kwargs):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "How many apples does Tom have?"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        **kwargs,
    )


def test_chat_steered_differs_and_streams_the_same(client, server):
    plain = chat(client).choices[0].message.content
    steered = chat(client, extra_body={"capabilities": ["cot"]})
    assert steered.choices[0].message.content != plain
    assert steered.usage.prompt_tokens > 0 and steered.usage.completion_tokens == MAX_TOKENS
    by_name = chat(client, model="tiny+cot").choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, model="tiny+cot", stream=True))
    assert steered.choices[0].message.content == by_name == streamed


def test_stream_response_carries_capability_header(server):
    body = {
        "model": "tiny+cot@0.25",
        "stream": True,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
    }
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-unlock-capabilities"] == "cot@0.25"
        assert "data: [DONE]" in r.read().decode()


def test_n_seed_logprobs_and_stop_pass_through(client):
    sampled = dict(model="tiny+cot", prompt=PROMPT, max_tokens=MAX_TOKENS, seed=7, temperature=1.0)
    out = client.completions.create(**sampled, n=2, logprobs=2)
    assert len(out.choices) == 2
    assert all(len(c.logprobs.tokens) == MAX_TOKENS for c in out.choices)
    again = client.completions.create(**sampled, n=2, logprobs=2)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    first = out.choices[0].text
    stop = first[len(first) // 2 :][:2]
    if stop.strip():
        cut = client.completions.create(**sampled, n=1, stop=[stop])
        assert stop not in cut.choices[0].text


def test_models_list_each_capability_with_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert {"tiny", "tiny+cot", "tiny+boost"} <= set(models)
    assert models["tiny+cot"].parent == "tiny" and models["tiny"].parent is None


def test_health_reports_wrapped_layers_and_metrics_count_capabilities(client, server):
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["plugin"]["wrapped_layers"] == 4
    assert health["capabilities"] == 2
    complete(client, capabilities=["boost"])
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert 'unlock_requests_total{capability="boost"}' in metrics
    assert "unlock_registry_capabilities 2.0" in metrics
    assert "vllm:" in metrics  # vLLM's own engine metrics next to ours
    assert "capabilities=boost@2" in server.log()  # the request log names its capabilities
