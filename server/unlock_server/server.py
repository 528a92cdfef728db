"""Owns the process: the engine, the app and uvicorn, and a clean engine shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from argparse import Namespace
from typing import Any

from .app import create_app
from .engine import check_engine_config, engine_kwargs
from .settings import Settings

logger = logging.getLogger(__name__)


def _raise_exit(signum: int, _frame: Any) -> None:
    # uvicorn stops gracefully, restores this handler and re-raises SIGTERM; raising SystemExit here lets
    # the `finally` below shut the engine-core child down instead of orphaning it.
    raise SystemExit(128 + signum)


def build_engine(args: Namespace, max_strength: float | None = None) -> Any:
    """The steering engine: vLLM's engine config from the flags plus the plugin's, checked before start."""
    from unlock_vllm import seams

    engine_args = seams.get("AsyncEngineArgs").from_cli_args(args)
    plugin = engine_kwargs(args.steering_runner, max_strength)
    if (
        engine_args.worker_extension_cls
        and engine_args.worker_extension_cls != plugin["worker_extension_cls"]
    ):
        raise SystemExit(
            f"unlock-serve: --worker-extension-cls {engine_args.worker_extension_cls!r} would replace "
            f"the steering extension {plugin['worker_extension_cls']!r}; drop the flag"
        )
    engine_args.worker_extension_cls = plugin["worker_extension_cls"]
    engine_args.additional_config = {**(engine_args.additional_config or {}), **plugin["additional_config"]}
    vllm_config = engine_args.create_engine_config()
    try:
        check_engine_config(vllm_config)
    except ValueError as exc:
        raise SystemExit(f"unlock-serve: {exc}") from None
    return seams.get("AsyncLLM").from_vllm_config(
        vllm_config,
        enable_log_requests=engine_args.enable_log_requests,
        disable_log_stats=engine_args.disable_log_stats,
    )


async def serve(args: Namespace, settings: Settings, on_start: Any = None) -> None:
    import uvicorn
    from unlock_vllm import seams

    engine = build_engine(args, settings.max_strength)
    try:
        app = await create_app(engine, args, settings, on_start)
        config = uvicorn.Config(
            app,
            host=args.host or "0.0.0.0",
            port=args.port,
            log_level=args.uvicorn_log_level,
            timeout_keep_alive=5,
            # SIGTERM: uvicorn closes the listening socket (new requests are refused) and waits this long
            # for requests in flight before cancelling them.
            timeout_graceful_shutdown=settings.drain_timeout,
        )
        logger.info(
            "unlock-serve on http://%s:%d (model %s, capabilities in %s)",
            args.host or "0.0.0.0",
            args.port,
            app.state.unlock_service.shape.served_names[0],
            settings.registry_dir,
        )
        server = uvicorn.Server(config)
        # vLLM's rule for a dead engine core: its error handler and watchdog stop the server (they read
        # `app.state.server`), so an orchestrator restarts the process instead of it answering 500 forever.
        app.state.server = server
        watchdog = asyncio.get_running_loop().create_task(seams.get("watchdog_loop")(server, engine))
        try:
            await server.serve()
        finally:
            watchdog.cancel()
        if engine.errored:
            raise SystemExit("unlock-serve: the vLLM engine died; exiting so that the process is restarted")
    finally:
        engine.shutdown()


def run(args: Namespace, settings: Settings) -> int:
    """Resolve the embedded default when no model is named, then serve until stopped."""
    on_start = None
    if args.model is None:
        from .default_model import prepare_default

        on_start = prepare_default(args, settings)
    if settings.api_key is None and settings.admin_key is None:
        logger.warning("no --api-key or --admin-key: every route, capability writes included, is open")
    signal.signal(signal.SIGTERM, _raise_exit)
    asyncio.run(serve(args, settings, on_start))
    return 0
