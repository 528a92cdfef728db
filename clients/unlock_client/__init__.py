"""Python client for unlock-serve's capability endpoints, plus helpers for the `openai` SDK."""

from unlock_client.client import AsyncUnlockClient, UnlockAPIError, UnlockClient
from unlock_client.selection import capabilities_extra_body, model_with_capabilities
from unlock_client.spec import parse_spec

__all__ = [
    "AsyncUnlockClient",
    "UnlockAPIError",
    "UnlockClient",
    "capabilities_extra_body",
    "model_with_capabilities",
    "parse_spec",
]
