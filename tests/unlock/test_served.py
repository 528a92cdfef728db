"""`unlock.served` against the capture endpoint's contract, answered in-process by the HF capture of the tiny
target (no engine): calls within the server's limits, answers put together in prompt order, chunk files as
`unlock capture` writes them, and the server's refusals as clear errors. The same against a real unlock-serve:
test_served_target.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as save_safetensors
from serve_harness import free_port
from served_builds import DEMO, TARGET_KEYS, build
from unlock_client import UnlockAPIError, UnlockClient

from unlock.capture import capture_all_positions, capture_last_token, load_model
from unlock.cli import main
from unlock.identity import config_sha256, model_name
from unlock.served import ServedTarget
from unlock.streams import capture_streams, load_layer, token_ends

PROMPTS = [
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?\nAnswer:",
    "A train travels 60 miles in 2 hours. What is its speed in miles per hour?",
    "The final answer is 42.",
    "Mary had a little lamb whose fleece was white as snow.",
    "Reason step by step before giving the final answer.",
    "There are 12 eggs in a dozen. If Sara uses 4 eggs, how many are left?",
    "user assistant system hello world numbers 0 1 2 3",
]


class FakeEndpoint:
    """`GET/POST /v1/capture` as the contract says, from the HF capture of ``lm``; records each call's
    prompts and refuses (413) a call past its prompt or token limit."""

    def __init__(self, lm, max_prompts: int, max_tokens: int):
        self.lm, self.calls = lm, []
        self.limits = {"max_prompts": max_prompts, "max_tokens": max_tokens, "max_bytes": 1 << 30}

    def info(self) -> dict:
        lm = self.lm
        return {"model": "tiny", "name": model_name(lm.name), "architecture": lm.architecture,
                "num_layers": lm.num_layers, "hidden_size": lm.hidden_size,
                "config_sha256": config_sha256(lm), "dtype": "float32", "offsets": True,
                "limits": self.limits}  # fmt: skip

    def capture(self, prompts: list[str], layers=None, positions="last", dtype="float32") -> bytes:
        tokens = [token_ends(self.lm.tokenizer, p) for p in prompts]
        n_tokens = sum(len(ids) for ids, _ in tokens)
        if len(prompts) > self.limits["max_prompts"] or n_tokens > self.limits["max_tokens"]:
            raise UnlockAPIError(413, f"{len(prompts)} prompts of {n_tokens} tokens: past the limits")
        self.calls.append(list(prompts))
        _, per_layer = capture_all_positions(self.lm, prompts, dtype=torch.float32)
        lengths = torch.tensor([len(ids) for ids, _ in tokens])
        rows = lengths.cumsum(0) - 1 if positions == "last" else torch.arange(int(lengths.sum()))
        ids = torch.tensor([t for ids, _ in tokens for t in ids])[rows]
        ends = torch.tensor([e for _, ends in tokens for e in ends])[rows]
        tensors = {f"layer.{i}": layer[rows].to(getattr(torch, dtype)) for i, layer in enumerate(per_layer)}
        tensors.update(
            ids=ids, ends=ends, lengths=lengths if positions == "all" else torch.ones_like(lengths)
        )
        return save_safetensors(tensors, {"format": "unlock.streams", "prompts": json.dumps(prompts)})


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def lm(tiny_target_model):
    return load_model(str(tiny_target_model), "float32", "cpu")


@pytest.fixture
def endpoint(lm, monkeypatch) -> FakeEndpoint:
    fake = FakeEndpoint(lm, max_prompts=3, max_tokens=100)
    monkeypatch.setattr(UnlockClient, "capture_info", lambda self: fake.info())
    monkeypatch.setattr(UnlockClient, "capture", lambda self, *args: fake.capture(*args))
    return fake


def test_calls_stay_within_the_limits_and_rows_come_back_in_prompt_order(lm, endpoint):
    served = ServedTarget.connect("http://unlock.invalid:8000/", "admin")
    assert (served.url, served.model, served.name) == (
        "http://unlock.invalid:8000",
        "tiny",
        model_name(lm.name),
    )
    assert (served.num_layers, served.hidden_size, served.config_sha256) == (4, 64, config_sha256(lm))
    assert "admin" not in repr(served)  # the key is never printed

    acts = served.capture_last_token(PROMPTS)
    assert relative_error(acts, capture_last_token(lm, PROMPTS)) < 1e-5  # padded in other batches
    assert [p for call in endpoint.calls for p in call] == PROMPTS  # each prompt once, in order
    assert all(len(call) <= 3 for call in endpoint.calls)  # max_prompts, known ahead
    assert len(endpoint.calls) > 3  # token counts are not: calls refused as too large were split

    endpoint.calls.clear()
    every = served.capture(PROMPTS[:3], positions="all")
    ids, layers = capture_all_positions(lm, PROMPTS[:3], dtype=torch.float32)
    assert every["lengths"].tolist() == [len(i) for i in ids]
    assert every["ids"].tolist() == [t for i in ids for t in i]
    assert all(relative_error(every[f"layer.{i}"], layer) < 1e-5 for i, layer in enumerate(layers))


def test_a_prompt_past_the_limits_alone_fails_with_the_server_s_message(endpoint):
    served = ServedTarget.connect("http://unlock.invalid:8000", "admin")
    with pytest.raises(ValueError, match="past the limits"):
        served.capture_last_token([" ".join(PROMPTS)])


def test_streams_are_unlock_capture_chunks_and_resume(lm, endpoint, tmp_path):
    served = ServedTarget.connect("http://unlock.invalid:8000", "admin")
    prompts = PROMPTS * 3  # two chunks of 16 and 5
    chunks = served.capture_streams(prompts, tmp_path)
    reference = capture_streams(lm, prompts, tmp_path)
    assert chunks[0].path.parent != reference[0].path.parent  # a store of its own
    assert [c.ids for c in chunks] == [c.ids for c in reference]
    assert [c.ends for c in chunks] == [c.ends for c in reference]
    for layer in range(lm.num_layers):
        assert relative_error(load_layer(chunks, layer), load_layer(reference, layer)) < 1e-3  # float16
    endpoint.calls.clear()
    assert [c.path for c in served.capture_streams(prompts, tmp_path)] == [c.path for c in chunks]
    assert endpoint.calls == []  # every chunk was there


def test_refusals_and_an_absent_server_are_clear_errors(monkeypatch):
    def refuse(self):
        raise UnlockAPIError(403, "wrong admin key for GET /v1/capture")

    monkeypatch.setattr(UnlockClient, "capture_info", refuse)
    with pytest.raises(
        ValueError, match="wrong admin key for GET /v1/capture .*--admin-key or UNLOCK_ADMIN_KEY"
    ):
        ServedTarget.connect("http://unlock.invalid:8000", "not-the-admin-key")
    monkeypatch.undo()
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match=f"cannot reach unlock-serve at {url}"):
        ServedTarget.connect(url, None)


def test_chat_template_with_a_served_target_is_refused_before_anything_runs(tmp_path, capsys):
    args = ["build", "--source-locked", str(tmp_path / "no-model"), "--target-url", "http://unlock.invalid",
            "--data", str(DEMO), "-n", "8", "--cv-folds", "2", "--name", "cot", "-o", str(tmp_path / "x"),
            "--chat-template"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot be wrapped in its chat template (--chat-template" in err and "drop --chat-template" in err
    with pytest.raises(SystemExit):  # exactly one of the two
        main([*args[:-1], "--target", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err


def test_build_through_the_endpoint_equals_build_from_the_folder(
    endpoint, tmp_path, capsys, tiny_source_model, tiny_target_model
):
    endpoint.limits.update(max_prompts=16, max_tokens=10_000)
    local = build(tmp_path / "local.safetensors", tiny_source_model, "--target", str(tiny_target_model))
    capsys.readouterr()
    url = ["--target-url", "http://unlock.invalid:8000", "--admin-key", "admin"]
    served = build(tmp_path / "served.safetensors", tiny_source_model, *url)
    assert (
        "--align-positions auto: all (the server's tokenizer gives character offsets"
        in capsys.readouterr().out
    )
    assert {k: served.metadata[k] for k in TARGET_KEYS} == {k: local.metadata[k] for k in TARGET_KEYS}
    assert served.metadata["n_pairs"] == local.metadata["n_pairs"]  # the same token pairs
    for mine, reference in zip(served.target_directions(), local.target_directions(), strict=True):
        assert relative_error(mine, reference) <= 1e-4  # per layer


def test_a_served_target_that_is_the_source_keeps_the_source_s_directions(
    endpoint, tmp_path, tiny_target_model
):
    url = ["--target-url", "http://unlock.invalid:8000", "--admin-key", "admin"]
    capability = build(tmp_path / "self.safetensors", tiny_target_model, *url)
    assert capability.metadata["alignment"] == "identity"  # same name and config hash: no map is fit
    assert endpoint.calls == []
