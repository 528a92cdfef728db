"""Storage faults under a registry write, driven for real, in-process over the fake engine (the fast tier's
practice for the registry, `test_inprocess_capabilities.py`): a full volume (507), a read-only volume (503)
and the `--registry-url` database stopped mid-run (503 with Retry-After). Each time the answer is in the
OpenAI error shape and names its cause, the registry is left exactly as it was (manifest and files), reads
and steered generation keep working, the fault is counted, and writes work again once the fault is gone.

The volumes are small tmpfs mounts made by the tests, so they need root (`mount`): these tests run as root
here and in CI (the CI container runs as root); elsewhere they fail, saying so. The database is a PostgreSQL
server of its own (`tests/postgres_server.py`), stopped and started again by the test.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fake_engine import client, settings
from postgres_server import PostgresServer, fresh_database
from serve_harness import capability_bytes

KEEP = capability_bytes("keep", seed=41, strength=3.0)
OTHER = capability_bytes("other", seed=42, strength=3.0)


def needs_root() -> None:
    """A missing prerequisite is a failure with its reason, never a silent skip."""
    if os.geteuid() != 0:
        pytest.fail("these tests mount a tmpfs and need root (CI runs as root)")


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@contextmanager
def tmpfs(path: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Write `path` until its volume is full."""
    with open(path, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC, err


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under the registry, with the manifest's bytes (None for the other files and folders)."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.name == "manifest.json" else None
        for p in root.rglob("*")
    }


def assert_error(response, status: int, fragment: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status, error
    assert fragment in error["message"], error["message"]
    return error


def names(api) -> list[str]:
    response = api.get("/v1/capabilities")
    assert response.status_code == 200, response.text
    return [c["name"] for c in response.json()["data"]]


def assert_reads_and_generation_work(api, listed: list[str]) -> None:
    """Listing, /v1/models and a request steered by `keep` (registered before the fault)."""
    assert names(api) == listed
    models = api.get("/v1/models")
    assert models.status_code == 200 and "tiny+keep" in [m["id"] for m in models.json()["data"]]
    steered = api.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "capabilities": ["keep"]})
    assert steered.status_code == 200, steered.text
    assert "unlock" in steered.json()["received"]["vllm_xargs"]


def faults(api, cause: str) -> float:
    return api.app.state.unlock_service.metrics.storage_errors.labels(cause)._value.get()


def test_a_full_volume_is_507_and_changes_nothing(tmp_path):
    needs_root()
    with tmpfs(tmp_path / "volume") as volume:
        config = settings(tmp_path, capabilities_dir=volume / "registry")
        with client(config) as api:
            assert api.post("/v1/capabilities", content=KEEP).status_code == 201
            before = snapshot(config.registry_dir)
            fill(volume / "filler")

            assert_error(api.post("/v1/capabilities", content=OTHER), 507, "volume is full (no space left")
            assert_error(api.delete("/v1/capabilities/keep"), 507, "volume is full")
            assert snapshot(config.registry_dir) == before  # no temp file, manifest untouched
            assert_reads_and_generation_work(api, ["keep"])
            assert faults(api, "no_space") == 2

            (volume / "filler").unlink()
            assert api.post("/v1/capabilities", content=OTHER).status_code == 201
            assert names(api) == ["keep", "other"]


def test_a_read_only_volume_is_503_and_changes_nothing(tmp_path):
    """The volume is remounted read-only while the server runs. Linux refuses that while a file on it is open
    for writing, and each writer holds its owner lock (`owners/`) open read-write for as long as it runs
    (flock over NFS needs it): so `owners/` is a mount of its own here. A kernel that remounts a volume
    read-only after an I/O error (`errors=remount-ro`) does not wait for open files."""
    needs_root()
    with tmpfs(tmp_path / "volume") as volume, tmpfs(volume / "registry" / "owners"):
        config = settings(tmp_path, capabilities_dir=volume / "registry")
        with client(config) as api:
            assert api.post("/v1/capabilities", content=KEEP).status_code == 201
            before = snapshot(config.registry_dir)
            mount("-o", "remount,ro", str(volume))
            try:
                assert_error(api.post("/v1/capabilities", content=OTHER), 503, "volume is read-only")
                assert_error(api.delete("/v1/capabilities/keep"), 503, "volume is read-only")
                assert_reads_and_generation_work(api, ["keep"])
                assert faults(api, "read_only") == 2
            finally:
                mount("-o", "remount,rw", str(volume))
            assert snapshot(config.registry_dir) == before
            assert api.post("/v1/capabilities", content=OTHER).status_code == 201
            assert names(api) == ["keep", "other"]


@pytest.fixture
def database() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, which it may stop."""
    server = PostgresServer().init()
    server.start()
    try:
        yield server
    finally:
        server.remove()


def test_the_database_stopped_is_503_with_retry_after_and_nothing_is_lost(tmp_path, database):
    config = settings(tmp_path, registry_url=fresh_database(database.url))
    with client(config) as api:
        service = api.app.state.unlock_service
        assert api.post("/v1/capabilities", content=KEEP).status_code == 201
        before = snapshot(config.registry_dir)
        database.stop()

        upload = api.post("/v1/capabilities", content=OTHER)
        assert_error(upload, 503, "registry database is unavailable (OperationalError")
        assert upload.headers["retry-after"] == "5"
        deleted = api.delete("/v1/capabilities/keep")
        assert_error(deleted, 503, "registry database is unavailable")
        assert deleted.headers["retry-after"] == "5"
        assert snapshot(config.registry_dir) == before  # the staged upload was removed
        assert_reads_and_generation_work(api, ["keep"])
        assert faults(api, "database_unavailable") == 2

        database.start()
        assert api.post("/v1/capabilities", content=OTHER).status_code == 201
        assert sorted(service.registry.read().entries) == ["keep", "other"]
        assert names(api) == ["keep", "other"]
        # This writer took its liveness lock again on the restarted server: others see it alive.
        assert service.registry.owner in service.registry.writers()


def test_a_replace_whose_cleanup_meets_the_database_stopped_took_effect_and_says_so(tmp_path, database):
    """The database stops right after a replace is published, before the replaced blob is removed: the
    replace took effect, so the answer is 201, not a 503 that says nothing was changed."""
    config = settings(tmp_path, registry_url=fresh_database(database.url))
    with client(config) as api:
        service = api.app.state.unlock_service
        old = api.post("/v1/capabilities", content=KEEP, params={"name": "steer"}).json()["sha256"]
        publish = service.registry.publish

        def publish_then_stop(*args):
            published = publish(*args)
            database.stop()
            return published

        service.registry.publish = publish_then_stop
        replaced = api.post("/v1/capabilities", content=OTHER, params={"name": "steer", "replace": "true"})
        assert replaced.status_code == 201, replaced.text
        listed = api.get("/v1/capabilities").json()["data"]
        assert [(c["name"], c["sha256"]) for c in listed] == [("steer", replaced.json()["sha256"])]
        assert service.registry.blob_path(old).exists()  # left for the next replica start to collect
        database.start()
