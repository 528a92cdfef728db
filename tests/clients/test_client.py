"""`unlock_client` (sync, async, `extra_body` helper) and the `unlockctl` CLI against the real server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import openai
import pytest
from serve_harness import capability_bytes, tiny_server
from unlock_client import (
    AsyncUnlockClient,
    UnlockAPIError,
    UnlockClient,
    capabilities_extra_body,
    model_with_capabilities,
)

API_KEY, ADMIN_KEY = "client-api-key", "client-admin-key"
PROMPT = "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?\nAnswer:"


@pytest.fixture(scope="module")
def server(tiny_target_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients")
    keys = ("--api-key", API_KEY, "--admin-key", ADMIN_KEY)
    proc = tiny_server(tiny_target_model, tmp / "registry", tmp / "server.log", *keys).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("artifact") / "hint.safetensors"
    path.write_bytes(capability_bytes("hint", seed=5, strength=3.0))
    return path


def test_sync_client_lifecycle_and_openai_sdk(server, artifact):
    with UnlockClient(server.url, api_key=ADMIN_KEY) as admin:
        created = admin.upload(artifact)
        assert created["name"] == "hint" and created["status"] == "ready"
        assert [c["name"] for c in admin.list()] == ["hint"]
        assert admin.get("hint")["sha256"] == created["sha256"]
        assert admin.health()["plugin"]["wrapped_layers"] == 4
        with pytest.raises(UnlockAPIError) as err:
            admin.upload_bytes(capability_bytes("hint", seed=6))
        assert err.value.status == 409 and err.value.param == "name"

    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    request = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    plain = sdk.completions.create(**request).choices[0].text
    steered = sdk.completions.create(**request, extra_body=capabilities_extra_body(["hint"])).choices[0].text
    by_name = sdk.completions.create(**{**request, "model": model_with_capabilities("tiny", ["hint"])})
    assert steered != plain and by_name.choices[0].text == steered

    with UnlockClient(server.url, api_key=API_KEY) as reader:
        with pytest.raises(UnlockAPIError) as err:
            reader.delete("hint")  # the API key cannot write
        assert err.value.status == 403
    with UnlockClient(server.url, api_key=ADMIN_KEY) as admin:
        assert admin.delete("hint")["deleted"] is True
        assert admin.list() == []


def test_async_client_lifecycle(server, artifact):
    async def scenario():
        async with AsyncUnlockClient(server.url, api_key=ADMIN_KEY) as client:
            created = await client.upload(artifact, name="hint-async")
            listed = [c["name"] for c in await client.list()]
            shown = await client.get("hint-async")
            deleted = await client.delete("hint-async")
            try:
                await client.get("hint-async")
                missing = None
            except UnlockAPIError as err:
                missing = err.status
            return created, listed, shown, deleted, missing

    created, listed, shown, deleted, missing = asyncio.run(scenario())
    assert created["name"] == "hint-async" and "hint-async" in listed
    assert shown["sha256"] == created["sha256"] and deleted["deleted"] is True and missing == 404


def unlockctl(server, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "UNLOCK_BASE_URL": server.url,
        "UNLOCK_API_KEY": API_KEY,
        "UNLOCK_ADMIN_KEY": ADMIN_KEY,
    }
    return subprocess.run(
        [sys.executable, "-m", "unlock_client.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unlockctl_upload_list_show_chat_delete(server, artifact):
    up = unlockctl(server, "upload", str(artifact), "--name", "ctl")
    assert up.returncode == 0, up.stderr
    assert '"name": "ctl"' in up.stdout
    listed = unlockctl(server, "list")
    assert listed.returncode == 0 and listed.stdout.startswith("ctl\trotate")
    assert '"mode": "rotate"' in unlockctl(server, "show", "ctl").stdout

    plain = unlockctl(server, "chat", "How many apples?", "--max-tokens", "8")
    steered = unlockctl(server, "chat", "How many apples?", "--max-tokens", "8", "--capability", "ctl@3")
    assert plain.returncode == 0 and steered.returncode == 0, steered.stderr
    assert "[capabilities: ctl@3]" in steered.stderr and "[capabilities: none]" in plain.stderr
    assert steered.stdout != plain.stdout
    streamed = unlockctl(server, "chat", "How many apples?", "--max-tokens", "8", "-c", "ctl@3", "--stream")
    assert streamed.stdout == steered.stdout

    refused = unlockctl(server, "chat", "hi", "--capability", "nope")
    assert (
        refused.returncode != 0
        and "HTTP 400" in refused.stderr
        and "unknown capability 'nope'" in refused.stderr
    )
    assert unlockctl(server, "delete", "ctl").returncode == 0
    gone = unlockctl(server, "show", "ctl")
    assert gone.returncode != 0 and "HTTP 404" in gone.stderr


def test_unlock_calibrate_through_the_server(server, artifact, tmp_path, capsys):
    """`unlock calibrate` against the real server: a probe uploaded and deleted, greedy generations steered
    over the grid, prompt logprobs (echo) for PMI, the table printed, then a default written or a clear
    refusal (random directions on a random model may qualify at no strength)."""
    from unlock import Capability
    from unlock.cli import main

    data = tmp_path / "questions.jsonl"
    data.write_text("".join(f'{{"question": "How many legs do {n} cats have?"}}\n' for n in range(2, 7)))
    target = tmp_path / "hint.safetensors"
    target.write_bytes(artifact.read_bytes())
    args = ["calibrate", str(target), "--url", server.url, "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
            "--data", str(data), "-n", "4", "--strengths", "0.5,3", "--max-tokens", "8"]  # fmt: skip
    code = main(args)
    out, err = capsys.readouterr()
    assert "strength  switched  on topic qualified" in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("0.5 ", "3 "))]) == 2
    if code == 0:
        calibrated = Capability.load(target)
        calibration = json.loads(calibrated.metadata["calibration"])
        tried = [row["strength"] for row in calibration["rows"]]
        assert tried[:2] == [0.5, 3.0] and calibrated.default_strength in tried  # any extension: 4.5, ...
        assert calibration["prompts"] == 4
    else:
        assert code == 2 and "no strength qualifies" in err
        assert Capability.load(target).default_strength == 3.0  # unchanged
    with UnlockClient(server.url, api_key=ADMIN_KEY) as client:
        assert not [c for c in client.list() if c["name"].startswith("calibrate-")]  # the probe is gone
        assert client.served_model() == "tiny"
