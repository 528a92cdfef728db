"""unlock-serve in this process over a fake engine, for the fast tier: no vLLM, no subprocess.

`fake_app` serves the OpenAI routes the way a test needs them: each generation route echoes the body vLLM's
handler would have received (so a test reads the wire selection the middleware wrote), or streams it as
server-sent events. `unlock_server.app.install` then adds the real routes, middleware, auth and registry,
exactly as `create_app` adds them to vLLM's app. The workers record registrations instead of loading them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient
from unlock_server.app import install
from unlock_server.coordination import coordination_for
from unlock_server.metrics import Metrics
from unlock_server.registry import Registry
from unlock_server.service import CapabilityService, ModelShape
from unlock_server.settings import Settings

SERVED = "tiny"
NUM_LAYERS, HIDDEN_SIZE = 4, 64  # what serve_harness.capability_bytes makes by default
# vLLM routes that take a JSON body and do not steer, today's and one a future release might add.
OTHER_JSON_ROUTES = ("/v1/responses", "/v1/messages", "/invocations", "/v1/some_future_generation")
FORM_ROUTE = "/v1/audio/transcriptions"  # takes `vllm_xargs` as a JSON string in a form field


class FakeWorkers:
    """What the engine has registered; registering reads the blob, as the real workers do."""

    def __init__(self) -> None:
        self.registered: set[str] = set()

    async def register(self, path: str, sha256: str) -> None:
        assert Path(path).stat().st_size > 0
        self.registered.add(sha256)

    async def unregister(self, sha256: str) -> None:
        self.registered.discard(sha256)

    async def status(self) -> list[dict[str, Any]]:
        return [{"ok": True, "wrapped_layers": NUM_LAYERS, "registered": sorted(self.registered)}]


class FakeModels:
    async def show_available_models(self) -> SimpleNamespace:
        card = {"id": SERVED, "object": "model", "owned_by": "vllm", "root": SERVED, "parent": None}
        return SimpleNamespace(model_dump=lambda: {"object": "list", "data": [dict(card)]})


class FakeEngineClient:
    async def check_health(self) -> None:
        return None


def fake_app(gate: asyncio.Event | None = None) -> FastAPI:
    """The OpenAI routes as echoes. A streamed request sends its first event, then waits for `gate`."""
    app = FastAPI()
    app.state.openai_serving_models = FakeModels()
    app.state.engine_client = FakeEngineClient()

    async def events(body: dict[str, Any]) -> AsyncIterator[bytes]:
        yield f"data: {json.dumps({'received': body})}\n\n".encode()
        if gate is not None:
            await gate.wait()
        yield b"data: [DONE]\n\n"

    async def generate(request: Request):
        body = await request.json()  # as vLLM's handlers parse it
        if body.get("stream"):
            return StreamingResponse(events(body), media_type="text/event-stream")
        return {"received": body}

    for path in ("/v1/completions", "/v1/chat/completions", *OTHER_JSON_ROUTES):
        app.add_api_route(path, generate, methods=["POST"])

    @app.post(FORM_ROUTE)
    async def transcribe(request: Request):
        form = await request.form()
        return {"received": {k: v for k, v in form.items() if isinstance(v, str)}}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse("vllm:fake 1\n")

    return app


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    defaults = {"capabilities_dir": tmp_path / "registry", "cache_dir": tmp_path / "cache"}
    return Settings(**{**defaults, **overrides})


def unlock_app(config: Settings, gate: asyncio.Event | None = None) -> FastAPI:
    """The fake engine's app with unlock-serve installed on a registry in `config.registry_dir`."""
    service = CapabilityService(
        Registry(config.registry_dir, coordination_for(config.registry_dir, config.registry_url)),
        FakeWorkers(),
        ModelShape(served_names=[SERVED], num_layers=NUM_LAYERS, hidden_size=HIDDEN_SIZE),
        Metrics(CollectorRegistry()),
        config.max_upload_bytes,
        config.max_strength,
        config.registry_poll_interval,
    )
    return install(fake_app(gate), service, config)


@contextmanager
def client(config: Settings, headers: dict[str, str] | None = None) -> Iterator[TestClient]:
    """A started app (lifespan run: the registry opened and applied) and a client for it."""
    with TestClient(unlock_app(config), headers=headers) as test_client:
        yield test_client
