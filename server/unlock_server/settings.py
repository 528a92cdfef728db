"""The server's own configuration: one pydantic-settings class, read from flags or `UNLOCK_*` variables.

vLLM's engine flags stay in vLLM's argparse namespace; only what unlock-serve adds lives here.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # a capability is a few rows per layer: 64 MiB is generous


def default_cache_dir() -> Path:
    return Path(os.path.expanduser("~/.cache/unlock-serve"))


class Settings(BaseSettings):
    """unlock-serve settings. Flags override `UNLOCK_*` environment variables, which override defaults.

    Auth: `api_key` guards inference and capability reads, `admin_key` guards capability writes.
    When only `api_key` is set it also guards writes; when neither is set the server is open (logged).
    """

    model_config = SettingsConfigDict(env_prefix="UNLOCK_", extra="ignore")

    api_key: str | None = None
    admin_key: str | None = None
    capabilities_dir: Path | None = None  # default: <cache_dir>/capabilities
    cache_dir: Path = Field(default_factory=default_cache_dir)
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    # Per-request strengths outside [-max_strength, max_strength] are refused: a typo like 15 instead of
    # 0.15 would otherwise wreck the output without any error.
    max_strength: float = 10.0
    # Generation requests in flight beyond this are answered 429 at once (None: no limit).
    max_concurrent_requests: int | None = None
    # On SIGTERM: stop accepting, let in-flight requests finish for up to this long, then cancel them.
    drain_timeout: float = 30.0
    # Seconds without a sync after which the shared manifest is read anyway: the fallback behind the pushed
    # changes (changes.py), so the bound on a change a push missed, or on every change where none is pushed.
    registry_poll_interval: float = 2.0
    # The registry's manifest, writer liveness and pins in a PostgreSQL database instead of files next to the
    # blobs: for shared filesystems whose locks do not exclude across hosts (docs/server.md).
    registry_url: str | None = None
    # One `/v1/capture` call at most: prompts, prompt tokens, bytes of the answer (rows x layers x hidden).
    capture_max_prompts: int = 256
    capture_max_tokens: int = 65536
    capture_max_bytes: int = 512 * 1024 * 1024

    @field_validator("api_key", "admin_key")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator(
        "max_upload_bytes",
        "max_concurrent_requests",
        "drain_timeout",
        "registry_poll_interval",
        "capture_max_prompts",
        "capture_max_tokens",
        "capture_max_bytes",
    )
    @classmethod
    def _positive(cls, value: float | None, info) -> float | None:
        if value is not None and value <= 0:
            raise ValueError(f"{info.field_name} must be positive, got {value}")
        return value

    def capture_limits(self) -> dict[str, int]:
        return {
            "max_prompts": self.capture_max_prompts,
            "max_tokens": self.capture_max_tokens,
            "max_bytes": self.capture_max_bytes,
        }

    @property
    def write_key(self) -> str | None:
        """The key that capability writes need: the admin key, else the API key."""
        return self.admin_key or self.api_key

    @property
    def registry_dir(self) -> Path:
        return self.capabilities_dir or self.cache_dir / "capabilities"
