"""`/v1/capture` on the real `unlock-serve` process: the residual stream the engine reads equals the HF
forward hook's (both positions modes, float32), the answer is an `unlock capture` chunk, generations running
beside a capture are unchanged, and every refusal (keys, limits, malformed input) is a 4xx in the OpenAI
error shape after which the engine keeps serving."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load
from serve_harness import capability_bytes, tiny_server

from unlock.capture import capture_all_positions, load_model
from unlock.identity import config_sha256, model_name
from unlock.streams import Chunk

API_KEY, ADMIN_KEY = "capture-api-key", "capture-admin-key"
API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
LIMITS = {
    "UNLOCK_CAPTURE_MAX_PROMPTS": "8",
    "UNLOCK_CAPTURE_MAX_TOKENS": "600",
    "UNLOCK_CAPTURE_MAX_BYTES": str(300_000),  # PROMPTS at every position: 222 rows x 4 layers x 64 x 4 bytes
}
PROMPTS = [
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "The quick brown fox jumps over the lazy dog " * 4,
    "A train travels 60 miles in 2 hours.",
]
STEER = capability_bytes("steer", seed=5, mode="rotate", strength=3.0)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(tiny_target_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("capture")
    env = {"UNLOCK_API_KEY": API_KEY, "UNLOCK_ADMIN_KEY": ADMIN_KEY, **LIMITS}
    proc = tiny_server(tiny_target_model, work / "registry", work / "server.log", env=env).start()
    response = httpx.post(f"{proc.url}/v1/capabilities", content=STEER, headers=ADMIN, timeout=60)
    assert response.status_code == 201, response.text
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def hf(tiny_target_model):
    lm = load_model(str(tiny_target_model), "float32", "cpu")
    _, layers = capture_all_positions(lm, PROMPTS, batch_size=4, dtype=torch.float32)
    return lm, torch.stack(layers, dim=1)  # [all tokens, layers, hidden]


def capture(server, headers=ADMIN, **body) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/capture", json={"prompts": PROMPTS, **body}, headers=headers, timeout=300
    )


def complete(server, model: str = "tiny+steer") -> list[str]:
    body = {"model": model, "prompt": PROMPTS[:2], "max_tokens": 24, "temperature": 0}
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=API, timeout=300)
    assert response.status_code == 200, response.text
    return [choice["text"] for choice in response.json()["choices"]]


def assert_close(got: torch.Tensor, want: torch.Tensor, label: str) -> None:
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
    relative = ((got - want).norm() / want.norm()).item()
    assert cosine >= 0.9999 and relative <= 1e-4, (label, cosine, relative)


def test_the_model_is_described_as_an_artifact_records_it(server, hf, tiny_target_model):
    lm, _ = hf
    info = httpx.get(f"{server.url}/v1/capture", headers=ADMIN, timeout=30).json()
    assert info["model"] == "tiny"
    assert (info["name"], info["config_sha256"]) == (model_name(str(tiny_target_model)), config_sha256(lm))
    assert (info["num_layers"], info["hidden_size"], info["dtype"]) == (4, 64, "float32")
    assert info["architecture"] == lm.architecture and info["offsets"] is True
    assert info["limits"]["max_prompts"] == 8


@pytest.mark.parametrize("positions", ["all", "last"])
def test_rows_equal_the_hf_stream_at_every_layer(server, hf, tmp_path, positions):
    lm, want = hf
    response = capture(server, positions=positions)
    assert response.status_code == 200, response.text
    got = load(response.content)
    lengths = [len(lm.tokenizer(p).input_ids) for p in PROMPTS]
    ends = torch.tensor(lengths).cumsum(0)
    rows = torch.arange(int(ends[-1])) if positions == "all" else ends - 1
    assert got["lengths"].tolist() == (lengths if positions == "all" else [1, 1, 1])
    ids = torch.tensor([t for p in PROMPTS for t in lm.tokenizer(p).input_ids])
    assert got["ids"].tolist() == ids[rows].tolist()
    for layer in range(4):
        assert_close(got[f"layer.{layer}"], want[rows, layer], f"{positions}, layer {layer}")
    if positions == "all":  # the layout of an `unlock capture` chunk, readable as one
        path = tmp_path / "chunk.safetensors"
        path.write_bytes(response.content)
        chunk = Chunk.open(path)
        assert [len(i) for i in chunk.ids] == lengths and chunk.ends[1][-1] == len(PROMPTS[1])


def test_chosen_layers_and_dtype(server, hf, tmp_path):
    response = capture(server, layers=[-1, 1], dtype="float16")
    assert response.status_code == 200, response.text
    path = tmp_path / "rows.safetensors"
    path.write_bytes(response.content)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["ends", "ids", "layer.1", "layer.3", "lengths"]
        assert f.metadata()["layers"] == "[1, 3]" and f.metadata()["positions"] == "last"
        assert f.get_tensor("layer.3").dtype == torch.float16


def test_generations_beside_a_capture_are_unchanged(server):
    alone = complete(server)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        generations = [pool.submit(complete, server) for _ in range(3)]
        captures = [pool.submit(capture, server, positions="all") for _ in range(2)]
        assert all(c.result().status_code == 200 for c in captures)
        assert [g.result() for g in generations] == [alone] * 3


@pytest.mark.parametrize(
    ("headers", "status"), [({}, 401), (API, 403), ({"Authorization": "Bearer wrong"}, 403)]
)
def test_only_the_admin_key_captures(server, headers, status):
    assert capture(server, headers=headers).status_code == status
    response = httpx.get(f"{server.url}/v1/capture", headers=headers, timeout=30)
    assert response.status_code == status
    assert response.json()["error"]["code"] == status


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"prompts": PROMPTS * 3}, 413, "9 prompts, over this server's 8"),
        ({"prompts": ["word " * 60] * 3}, 413, "723 prompt tokens, over this server's 600"),
        ({"prompts": ["word " * 60] * 2, "positions": "all"}, 413, "bytes, over this server's 300000"),
        ({"prompts": ["tokens " * 2000]}, 400, "max_model_len"),
        ({"prompts": []}, 400, "prompts"),
        ({"prompts": [""]}, 400, "prompt 0 has 0 tokens"),
        ({"prompts": PROMPTS, "layers": [4]}, 400, "layers must be indices"),
        ({"prompts": PROMPTS, "positions": "first"}, 400, "positions"),
        ({"prompts": PROMPTS, "dtype": "int8"}, 400, "dtype"),
        ({"prompts": PROMPTS, "stream": True}, 400, "stream"),
        ({"prompts": PROMPTS, "model": "other"}, 404, "not 'other'"),
        ({"prompts": "one prompt"}, 400, "prompts"),
    ],
)
def test_bad_captures_are_refused_and_the_engine_keeps_serving(server, body, status, fragment):
    response = httpx.post(f"{server.url}/v1/capture", json=body, headers=ADMIN, timeout=120)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and fragment in error["message"], error
    assert len(complete(server)) == 2
