"""What the hardening tests share: one tiny `unlock-serve` per module, and the registry invariants.

The server process itself comes from `tests/serve_harness.py` (the same launcher tests/server uses).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import serve_harness
from serve_harness import ServerProcess

UPLOAD_LIMIT = 1 << 20
PROMPT = "Question: A train travels 60 miles in 2 hours. What is its speed?\nAnswer:"


def tiny_server(model: Path, registry_dir: Path, log_path: Path, *extra: str) -> ServerProcess:
    """An open (no keys) tiny server on `registry_dir`; not started."""
    limit = ("--max-upload-bytes", str(UPLOAD_LIMIT))
    return serve_harness.tiny_server(model, registry_dir, log_path, *limit, *extra)


def complete(url: str, timeout: float = 120, **body) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **body}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


def upload(url: str, data: bytes, timeout: float = 120, **params) -> httpx.Response:
    return httpx.post(f"{url}/v1/capabilities", content=data, params=params, timeout=timeout)


def assert_openai_error(response: httpx.Response, status: int, fragment: str = "") -> None:
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert error["code"] == status, error
    assert fragment in error["message"], error["message"]


def snapshot(root: Path) -> set[str]:
    """Every path under `root` (files and folders), relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_registry_consistent(registry_dir: Path) -> dict[str, dict]:
    """Every manifest entry has its blob with the right sha256, no blob is unnamed, no temp file is left.
    Returns the manifest's entries."""
    manifest = json.loads((registry_dir / "manifest.json").read_text())
    entries = manifest["capabilities"]
    blobs = {p.name for p in (registry_dir / "blobs").iterdir()}
    named = {f"{e['sha256']}.safetensors" for e in entries.values()}
    for name, entry in entries.items():
        blob = registry_dir / "blobs" / f"{entry['sha256']}.safetensors"
        assert blob.is_file(), f"manifest entry {name!r} has no blob {blob}"
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == entry["sha256"], (
            f"blob of {name!r} is corrupt"
        )
        assert blob.stat().st_size == entry["size_bytes"], f"blob of {name!r} has the wrong size"
    assert blobs <= named, f"blobs no manifest entry names: {sorted(blobs - named)}"
    leftovers = [p.name for p in registry_dir.iterdir() if p.name.startswith(".manifest.")]
    leftovers += [f"tmp/{p.name}" for p in (registry_dir / "tmp").iterdir()]
    assert not leftovers, f"temp files left in the registry: {leftovers}"
    return entries
