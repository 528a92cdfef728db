"""The app factory: vLLM's OpenAI app (`build_app` + `init_app_state`) with our routes and middleware
(`install`, which the in-process tests apply to a fake engine's app)."""

from __future__ import annotations

import logging
from argparse import Namespace
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from starlette.routing import BaseRoute

from .auth import AuthMiddleware
from .capture import CAPTURE_PATH
from .capture import router as capture_router
from .coordination import coordination_for
from .engine import Workers
from .errors import APIError
from .limits import ConcurrencyLimitMiddleware
from .metrics import Metrics
from .middleware import SelectionMiddleware
from .playground import router as playground_router
from .registry import Registry
from .routes import UPLOAD_PATH, router
from .service import CapabilityService, ModelShape
from .settings import Settings

logger = logging.getLogger(__name__)

# vLLM routes our routers replace (ours add capability entries and plugin status).
REPLACED_PATHS = frozenset({"/health", "/v1/models"})


def model_shape(engine: Any, served_names: list[str]) -> ModelShape:
    config = engine.model_config
    return ModelShape(
        served_names=served_names,
        num_layers=int(config.hf_text_config.num_hidden_layers),
        hidden_size=int(config.get_hidden_size()),
    )


def _drop_routes(routes: list[BaseRoute], paths: frozenset[str]) -> None:
    routes[:] = [r for r in routes if getattr(r, "path", None) not in paths]


async def create_app(
    engine: Any,
    args: Namespace,
    settings: Settings,
    on_start: Callable[[CapabilityService], Any] | None = None,
) -> FastAPI:
    """Build the app around a running engine. The lifespan reloads the registry onto the workers before the
    first request; `on_start` (the embedded default's demo capability) runs right after."""
    from unlock_vllm import seams

    build_app, init_app_state = seams.get("build_app"), seams.get("init_app_state")
    supported_tasks = await engine.get_supported_tasks()
    app = build_app(args, supported_tasks, engine.model_config)
    await init_app_state(engine, app.state, args, supported_tasks)

    served_names = list(args.served_model_name or [args.model])
    service = CapabilityService(
        Registry(settings.registry_dir, coordination_for(settings.registry_dir, settings.registry_url)),
        Workers(engine),
        model_shape(engine, served_names),
        Metrics(),
        settings.max_upload_bytes,
        settings.max_strength,
        settings.registry_poll_interval,
    )
    return install(app, service, settings, on_start)


def install(
    app: FastAPI,
    service: CapabilityService,
    settings: Settings,
    on_start: Callable[[CapabilityService], Any] | None = None,
) -> FastAPI:
    """unlock-serve's parts on an app that serves the OpenAI routes: vLLM's (`create_app`), or a fake
    engine's in the in-process tests. Routes, the error shape, the registry's lifespan and the middleware."""
    app.state.unlock_service = service
    app.state.unlock_settings = settings
    _drop_routes(app.router.routes, REPLACED_PATHS)
    app.include_router(router)
    app.include_router(capture_router)
    app.include_router(playground_router)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError):
        return err.response()

    outer_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        if on_start is not None:
            await on_start(service)
        try:
            async with outer_lifespan(app_):
                yield
        finally:
            await service.stop()

    app.router.lifespan_context = lifespan
    # vLLM's build_app already built the middleware stack; drop it so Starlette rebuilds it with ours on the
    # first request. Added last = outermost: auth runs before the body is read or rewritten, and the
    # concurrency limit answers 429 before a body is read.
    app.middleware_stack = None
    app.add_middleware(SelectionMiddleware, service=service, exempt=frozenset({UPLOAD_PATH, CAPTURE_PATH}))
    app.add_middleware(ConcurrencyLimitMiddleware, limit=settings.max_concurrent_requests)
    app.add_middleware(AuthMiddleware, settings=settings)
    return app
