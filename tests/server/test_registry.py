"""The on-disk registry without a server: a crash at any step of an upload leaves it as it was."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from unlock_server.errors import APIError
from unlock_server.registry import Entry, Registry, check_name


def entry(name: str, sha256: str) -> Entry:
    return Entry(
        name=name,
        sha256=sha256,
        mode="rotate",
        layers=[0],
        default_strength=0.1,
        target={"num_layers": 4, "hidden_size": 64},
        metadata={},
        size_bytes=3,
    )


async def chunks(*parts: bytes, fail_after: int | None = None):
    for i, part in enumerate(parts):
        if fail_after is not None and i == fail_after:
            raise ConnectionResetError("client went away")
        yield part


def stage(registry: Registry, *parts: bytes, limit: int = 1 << 20, fail_after: int | None = None):
    return asyncio.run(registry.stage(chunks(*parts, fail_after=fail_after), limit))


@pytest.fixture
def registry(tmp_path) -> Registry:
    reg = Registry(tmp_path / "registry")
    reg.load()
    staged = stage(reg, b"abc")
    reg.place(staged)
    reg.publish(entry("first", staged.sha256))
    return reg


def snapshot(registry: Registry) -> tuple[bytes, list[str]]:
    return registry.manifest_path.read_bytes(), sorted(p.name for p in registry.blobs.iterdir())


def test_publish_round_trips_through_a_fresh_load(registry):
    again = Registry(registry.root)
    assert [(e.name, e.sha256) for e in again.load()] == [("first", registry.get("first").sha256)]
    assert again.blob_path(again.get("first").sha256).read_bytes() == b"abc"


def test_client_disconnect_mid_upload_leaves_nothing(registry):
    before = snapshot(registry)
    with pytest.raises(ConnectionResetError):
        stage(registry, b"x" * 10, b"y" * 10, fail_after=1)
    assert list(registry.tmp.iterdir()) == [] and snapshot(registry) == before


def test_oversize_upload_is_413_and_leaves_nothing(registry):
    before = snapshot(registry)
    with pytest.raises(APIError) as err:
        stage(registry, b"x" * 600, b"y" * 600, limit=1000)
    assert err.value.status == 413 and "1000" in err.value.message
    assert list(registry.tmp.iterdir()) == [] and snapshot(registry) == before


def test_crash_between_blob_and_manifest_is_swept_at_start(registry):
    manifest = registry.manifest_path.read_bytes()
    registry.place(stage(registry, b"orphan"))  # ... and the process dies before publish()
    (registry.tmp / "half.upload").write_bytes(b"partial")  # and an upload was mid-stream
    again = Registry(registry.root)
    assert [e.name for e in again.load()] == ["first"]
    assert again.manifest_path.read_bytes() == manifest
    assert sorted(p.name for p in again.blobs.iterdir()) == [f"{again.get('first').sha256}.safetensors"]
    assert list(again.tmp.iterdir()) == []


def test_crash_while_writing_the_manifest_keeps_the_old_one(registry, monkeypatch):
    before = registry.manifest_path.read_bytes()
    staged = stage(registry, b"second")
    registry.place(staged)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        registry.publish(entry("second", staged.sha256))
    monkeypatch.undo()
    assert registry.manifest_path.read_bytes() == before
    assert registry.get("second") is None
    assert [p.name for p in registry.root.iterdir() if p.name.startswith(".manifest")] == []
    assert json.loads(before)["capabilities"].keys() == {"first"}


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "..", "x..y", "-lead", "", "a" * 65, "a b", "cot+x", "cot@1"]
)
def test_unsafe_names_are_refused(name):
    with pytest.raises(APIError) as err:
        check_name(name)
    assert err.value.status == 400 and err.value.param == "name"


@pytest.mark.parametrize("name", ["cot", "CoT-2", "math_v1.2", "a" * 64])
def test_safe_names_pass(name):
    assert check_name(name) == name
