"""API keys: the API key on every route but the public ones (a middleware, so vLLM's routes are covered too),
and the admin key on the routes that change the registry (a dependency those routes declare).

Keys are sent as `Authorization: Bearer <key>` (what the openai SDK sends) or `x-api-key`. A missing key is
401, a wrong one 403; the admin key also opens every route the API key opens.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError
from .settings import Settings

# Liveness, scraping and the playground's static files carry no data and must load without a secret (a
# browser cannot add a header to a page navigation); everything else is guarded.
PUBLIC_PATHS = frozenset({"/health", "/metrics", "/playground"})
PUBLIC_PREFIXES = ("/metrics/", "/playground/")


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value:
            return value.decode("latin-1")
    return None


def check_key(
    headers: list[tuple[bytes, bytes]], needed: str | None, settings: Settings, kind: str, what: str
) -> None:
    """Pass when no key is needed or one of `needed` and the admin key is presented; else 401 or 403."""
    if needed is None:
        return
    presented = presented_key(headers)
    if presented is None:
        raise APIError(401, f"missing {kind}: send 'Authorization: Bearer <key>'")
    accepted = [k for k in (needed, settings.admin_key) if k]
    if not any(hmac.compare_digest(presented.encode(), k.encode()) for k in accepted):
        raise APIError(403, f"wrong {kind} for {what}")


class AuthMiddleware:
    """The API key on every non-public route, whatever router (ours or vLLM's) serves it."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]):
            return await self.app(scope, receive, send)
        try:
            what = f"{scope['method']} {scope['path']}"
            check_key(scope["headers"], self.settings.api_key, self.settings, "API key", what)
        except APIError as err:
            return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


def require_admin(request: Request) -> None:
    """Dependency of the routes that change the registry: the admin key (default: the API key)."""
    settings: Settings = request.app.state.unlock_settings
    what = f"{request.method} {request.url.path}"
    check_key(request.scope["headers"], settings.write_key, settings, "admin key", what)
