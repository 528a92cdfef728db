"""Thin routers: capability CRUD (writes need the admin key, declared per route), /health with the plugin's
status, /v1/models with capability entries."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from .auth import require_admin
from .service import CapabilityService
from .summary import layer_summary

logger = logging.getLogger(__name__)

router = APIRouter()
UPLOAD_PATH = "/v1/capabilities"  # its body is an artifact streamed to the registry, not a generation request
ADMIN = [Depends(require_admin)]


def get_service(request: Request) -> CapabilityService:
    return request.app.state.unlock_service


Service = Annotated[CapabilityService, Depends(get_service)]


@router.post(UPLOAD_PATH, dependencies=ADMIN)
async def upload_capability(
    request: Request,
    service: Service,
    name: Annotated[str | None, Query(description="name to register under; default: the artifact's")] = None,
    replace: Annotated[
        bool, Query(description="replace a capability of this name with other content")
    ] = False,
) -> JSONResponse:
    body, created = await service.upload(request.stream(), name, replace)
    return JSONResponse(body, status_code=201 if created else 200)


@router.get("/v1/capabilities")
async def list_capabilities(service: Service) -> dict[str, Any]:
    # max_strength: the limit this server puts on |strength|, so a client (the playground) need not guess it
    return {
        "object": "list",
        "data": service.list(),
        "max_strength": service.max_strength,
        "registry": service.sync_status(),
    }


@router.get("/v1/capabilities/{name}")
async def show_capability(name: str, service: Service) -> dict[str, Any]:
    """The capability plus `per_layer`: each steered layer's direction norm, source layer and held-out
    alignment error (null when the blob cannot be read, e.g. deleted meanwhile)."""
    body = service.get(name)
    try:
        path = service.registry.blob_path(body["sha256"])
        rows = await asyncio.to_thread(layer_summary, path, body["sha256"])
        body["per_layer"] = list(rows)
    except Exception as err:  # a summary is a view: its failure must not hide the capability itself
        logger.warning("no per-layer summary for %r: %s", name, err)
        body["per_layer"] = None
    return body


@router.delete("/v1/capabilities/{name}", dependencies=ADMIN)
async def delete_capability(name: str, service: Service) -> dict[str, Any]:
    return await service.delete(name)


@router.get("/v1/models")
async def list_models(request: Request, service: Service) -> dict[str, Any]:
    """vLLM's model list plus one `<served>+<capability>` entry per usable capability."""
    models = (await request.app.state.openai_serving_models.show_available_models()).model_dump()
    base = next((m for m in models["data"] if m["id"] == service.shape.served_names[0]), None)
    for cap in service.list():
        if cap["status"] != "ready" or base is None:
            continue
        models["data"].append(
            {**base, "id": f"{base['id']}+{cap['name']}", "parent": base["id"], "permission": []}
        )
    return models


@router.get("/health")
async def health(request: Request, service: Service) -> JSONResponse:
    """Engine liveness, proof that steering is installed (wrapped layers per worker), and this replica's
    sync with the shared registry."""
    engine = request.app.state.engine_client
    try:
        await engine.check_health()
        workers = await service.workers.status()
    except Exception as err:  # a dead engine is exactly what /health must report, whatever it raised
        return JSONResponse({"status": "error", "error": f"{type(err).__name__}: {err}"}, status_code=503)
    wrapped = [int(w.get("wrapped_layers", 0)) for w in workers]
    ok = bool(wrapped) and all(n > 0 for n in wrapped)
    body = {
        "status": "ok" if ok else "degraded",
        "model": service.shape.served_names[0],
        "capabilities": len(service.list()),
        "registry": service.sync_status(),
        "plugin": {"wrapped_layers": min(wrapped, default=0), "workers": workers},
    }
    return JSONResponse(body, status_code=200 if ok else 503)
