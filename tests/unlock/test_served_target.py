"""`unlock` with a real unlock-serve as its target (the tiny Qwen2, float32, through `/v1/capture`): the rows
it captures equal the HF capture of the same folder, its chunks are `unlock capture`'s, a capability built
with `--target-url` equals one built with `--target FOLDER`, and a key that is not the admin key fails before
any source capture. The client's side alone, against the endpoint's contract: test_served.py."""

from __future__ import annotations

import pytest
import torch
from serve_harness import tiny_server
from served_builds import DEMO, TARGET_KEYS, build

from unlock.capture import capture_all_positions, capture_last_token, format_prompts, load_model
from unlock.cli import main
from unlock.data import load_questions
from unlock.identity import config_sha256, model_name
from unlock.served import ServedTarget
from unlock.streams import capture_streams, load_layer, token_ends
from unlock.templates import load_template

pytestmark = pytest.mark.engine  # starts a real unlock-serve (tests/engine_guard.py)

API_KEY, ADMIN_KEY = "served-api-key", "served-admin-key"
# Small limits, so that the client's calls are split as a large capture's would be.
LIMITS = {"UNLOCK_CAPTURE_MAX_PROMPTS": "6", "UNLOCK_CAPTURE_MAX_TOKENS": "600"}


@pytest.fixture(scope="module")
def server(tiny_target_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("served-target")
    env = {"UNLOCK_API_KEY": API_KEY, "UNLOCK_ADMIN_KEY": ADMIN_KEY, **LIMITS}
    proc = tiny_server(tiny_target_model, work / "registry", work / "server.log", env=env).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def lm(tiny_target_model):
    return load_model(str(tiny_target_model), "float32", "cpu")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return format_prompts(None, load_questions(DEMO, "question", 20), load_template("direct"))


def assert_close(got: torch.Tensor, want: torch.Tensor, label: str) -> None:
    """Rows [N, hidden]: each row's cosine >= 0.9999, relative error <= 1e-4 over all of them."""
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
    relative = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert cosine >= 0.9999 and relative <= 1e-4, (label, cosine, relative)


def test_the_served_model_is_described_as_its_folder_would_be(server, lm, tiny_target_model):
    served = ServedTarget.connect(server.url, ADMIN_KEY)
    assert (served.model, served.name) == ("tiny", model_name(str(tiny_target_model)))
    assert (served.architecture, served.num_layers, served.hidden_size) == (lm.architecture, 4, 64)
    assert (served.config_sha256, served.dtype, served.offsets) == (config_sha256(lm), "float32", True)
    assert served.limits.max_prompts == 6
    with pytest.raises(ValueError, match=r"serves \['tiny'\], not 'other'"):
        ServedTarget.connect(server.url, ADMIN_KEY, model="other")


def test_last_token_rows_equal_the_hf_capture(server, lm, prompts):
    got = ServedTarget.connect(server.url, ADMIN_KEY).capture_last_token(prompts)  # 20 prompts, 6 a call
    want = capture_last_token(lm, prompts)
    assert got.shape == want.shape == (20, 4, 64)
    for layer in range(4):
        assert_close(got[:, layer], want[:, layer], f"last, layer {layer}")


def test_every_position_equals_the_hf_capture(server, lm, prompts):
    got = ServedTarget.connect(server.url, ADMIN_KEY).capture(prompts, positions="all", dtype="float32")
    ids, want = capture_all_positions(lm, prompts, dtype=torch.float32)
    assert got["lengths"].tolist() == [len(i) for i in ids]
    assert got["ids"].tolist() == [t for i in ids for t in i]
    assert got["ends"].tolist() == [e for p in prompts for e in token_ends(lm.tokenizer, p)[1]]
    for layer in range(4):
        assert_close(got[f"layer.{layer}"], want[layer], f"all, layer {layer}")


def test_unlock_capture_through_the_server_writes_unlock_capture_chunks(server, lm, prompts, tmp_path):
    corpus = ["--data", str(DEMO), "-n", "20", "--capture-dir", str(tmp_path)]
    assert main(["capture", "--model-url", server.url, "--admin-key", ADMIN_KEY, *corpus]) == 0
    served = ServedTarget.connect(server.url, ADMIN_KEY)
    chunks = served.capture_streams(prompts, tmp_path)  # already there: read, not captured again
    assert len(chunks) == 2 and all(c.path.parent == served.store_dir(tmp_path) for c in chunks)
    stamps = [c.path.stat().st_mtime_ns for c in chunks]
    assert [c.path.stat().st_mtime_ns for c in served.capture_streams(prompts, tmp_path)] == stamps
    reference = capture_streams(lm, prompts, tmp_path)  # the HF store, beside it
    assert reference[0].path.parent != chunks[0].path.parent
    assert [c.ids for c in chunks] == [c.ids for c in reference]
    assert [c.ends for c in chunks] == [c.ends for c in reference]
    for layer in range(4):
        got, want = load_layer(chunks, layer).float(), load_layer(reference, layer).float()
        assert_close(got, want, f"float16 chunks, layer {layer}")


def test_build_through_the_server_equals_build_from_the_folder(
    server, tmp_path, capsys, tiny_source_model, tiny_target_model
):
    local = build(tmp_path / "local.safetensors", tiny_source_model, "--target", str(tiny_target_model))
    capsys.readouterr()
    url = ["--target-url", server.url, "--admin-key", ADMIN_KEY]
    served = build(tmp_path / "served.safetensors", tiny_source_model, *url)
    assert "--align-positions auto: all (the server's tokenizer" in capsys.readouterr().out
    assert {k: served.metadata[k] for k in TARGET_KEYS} == {k: local.metadata[k] for k in TARGET_KEYS}
    assert served.metadata["n_pairs"] == local.metadata["n_pairs"]  # the same token pairs
    assert served.layers == local.layers == [1, 2, 3]
    for layer, mine, reference in zip(
        served.layers, served.target_directions(), local.target_directions(), strict=True
    ):
        assert_close(mine[None], reference[None], f"direction of layer {layer}")


@pytest.mark.parametrize(("key", "status"), [(API_KEY, "HTTP 403"), (None, "HTTP 401")])
def test_a_key_that_is_not_the_admin_key_fails_before_any_source_capture(
    server, tmp_path, capsys, monkeypatch, tiny_source_model, key, status
):
    def refuse(*args, **kwargs):
        raise AssertionError("the source was captured before the target's server was asked")

    monkeypatch.setattr("unlock.cli.run_extract", refuse)
    monkeypatch.delenv("UNLOCK_ADMIN_KEY", raising=False)  # the flag's default
    keys = ["--admin-key", key] if key else []
    out = tmp_path / "x.safetensors"
    argv = ["build", "--source-locked", str(tiny_source_model), "--target-url", server.url, *keys,
            "--data", str(DEMO), "-n", "16", "--name", "cot", "-o", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"unlock-serve at {server.url}: {status}: " in err and "admin key" in err, err
    assert not out.exists()
