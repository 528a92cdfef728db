"""The on-disk registry without a server: a crash at any step of an upload leaves it as it was."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from unlock_server.errors import APIError
from unlock_server.manifest import ManifestEntry
from unlock_server.registry import Registry, check_name


def entry(name: str, sha256: str) -> ManifestEntry:
    return ManifestEntry(
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
def registry(tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.open()
    staged = stage(reg, b"abc")
    reg.place(staged)
    reg.publish(entry("first", staged.sha256), replace=False)
    yield reg
    reg.close()


def snapshot(registry: Registry) -> tuple[bytes, list[str]]:
    return registry.coordination.manifest_path.read_bytes(), sorted(p.name for p in registry.blobs.iterdir())


def sha_of(registry: Registry, name: str) -> str:
    return registry.read().entries[name].sha256


def test_publish_round_trips_through_a_fresh_open(registry):
    again = Registry(registry.root)
    manifest = again.open()
    assert [(n, e.sha256) for n, e in manifest.entries.items()] == [("first", sha_of(registry, "first"))]
    assert again.blob_path(sha_of(again, "first")).read_bytes() == b"abc"
    assert manifest.generation == 1 and manifest.writer == registry.owner


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


def test_crash_between_blob_and_manifest_is_swept_at_the_next_start(registry):
    manifest = registry.coordination.manifest_path.read_bytes()
    registry.place(stage(registry, b"orphan"))  # ... and the process dies before publish()
    stage(registry, b"partial")  # with an upload mid-stream
    (registry.tmp / "tmpold.upload").write_bytes(b"x")  # and one from a writer without an owner lock
    registry.close()  # what the kernel does to a dead process's locks
    again = Registry(registry.root)
    assert list(again.open().entries) == ["first"]
    assert again.coordination.manifest_path.read_bytes() == manifest
    assert sorted(p.name for p in again.blobs.iterdir()) == [f"{sha_of(again, 'first')}.safetensors"]
    assert list(again.tmp.iterdir()) == []
    assert [p.name for p in again.coordination.owners.iterdir()] == [f"{again.owner}.lock"]


def test_crash_while_writing_the_manifest_keeps_the_old_one(registry, monkeypatch):
    before = registry.coordination.manifest_path.read_bytes()
    staged = stage(registry, b"second")
    registry.place(staged)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        registry.publish(entry("second", staged.sha256), replace=False)
    monkeypatch.undo()
    assert registry.coordination.manifest_path.read_bytes() == before
    assert "second" not in registry.read().entries
    assert [p.name for p in registry.root.iterdir() if p.name.startswith(".manifest")] == []
    assert json.loads(before)["capabilities"].keys() == {"first"}


def test_a_manifest_without_generation_reads_as_generation_0(registry):
    data = json.loads(registry.coordination.manifest_path.read_text())
    for key in ("generation", "updated_at", "writer"):
        del data[key]
    registry.coordination.manifest_path.write_text(json.dumps(data))
    manifest = registry.read()
    assert manifest.generation == 0 and list(manifest.entries) == ["first"]
    staged = stage(registry, b"next")
    registry.place(staged)
    assert registry.publish(entry("next", staged.sha256), replace=False)[0].generation == 1


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
