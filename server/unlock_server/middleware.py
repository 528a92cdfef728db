"""ASGI middleware: API-key auth, and capability selection rewritten into vLLM's request body.

Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched, and so the in-flight
count of a streamed request lasts until its last chunk is sent.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .engine import XARGS_KEY, encode_selection
from .errors import APIError
from .selection import PARAM, check_unique, parse_field, parse_model_suffix, split_model
from .service import Applied, CapabilityService
from .settings import Settings

logger = logging.getLogger(__name__)

INFERENCE_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
# vLLM's other routes that take `vllm_xargs`: no steering there, and the wire selection may not be smuggled in
# (it would skip the strength limit and the in-flight tracking that keeps a deleted capability registered).
UNSTEERED_ROUTES = frozenset(
    {"/invocations", "/v1/chat/completions/batch", "/v1/responses", "/v1/messages", "/generative_scoring"}
)
HEADER = b"x-unlock-capabilities"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _is_public(path: str) -> bool:
    # Liveness and scraping must work without secrets; everything else is guarded.
    return path == "/health" or path == "/metrics" or path.startswith("/metrics/")


def _presented_key(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value:
            return value.decode("latin-1")
    return None


class AuthMiddleware:
    """401 when a needed key is missing, 403 when it is wrong. The admin key opens every route."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_public(scope["path"]):
            return await self.app(scope, receive, send)
        is_write = scope["path"].startswith("/v1/capabilities") and scope["method"] in WRITE_METHODS
        needed = self.settings.write_key if is_write else self.settings.api_key
        if needed is None:
            return await self.app(scope, receive, send)
        presented = _presented_key(scope)
        if presented is None:
            error = APIError(401, "missing API key: send 'Authorization: Bearer <key>'")
        elif any(
            hmac.compare_digest(presented.encode(), k.encode())
            for k in (needed, self.settings.admin_key)
            if k
        ):
            return await self.app(scope, receive, send)
        else:
            kind = "admin key" if is_write else "API key"
            error = APIError(403, f"wrong {kind} for {scope['method']} {scope['path']}")
        await error.response()(scope, receive, send)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


class SelectionMiddleware:
    """Resolves `capabilities` / `<model>+name@s` on the two generation routes and rewrites the body into
    `vllm_xargs: {"unlock": ...}` with the plain served model name, before vLLM's handler parses it."""

    def __init__(self, app: ASGIApp, service: CapabilityService):
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if scope["path"] in UNSTEERED_ROUTES:
            return await self._unsteered(scope, receive, send)
        if scope["path"] not in INFERENCE_ROUTES:
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None  # vLLM answers malformed JSON in its own words
        had_field = isinstance(payload, dict) and PARAM in payload
        model = payload.get("model") if isinstance(payload, dict) else None  # as asked, before the rewrite
        try:
            applied = self._rewrite(payload) if isinstance(payload, dict) else []
        except APIError as err:
            self.service.metrics.refusals.inc()
            logger.info("%s refused: %s", scope["path"], err.message)
            return await err.response()(scope, receive, send)
        if applied or had_field:
            body = json.dumps(payload).encode()
        label = ",".join(a.label for a in applied)
        logger.info(
            "%s model=%s capabilities=%s",
            scope["path"],
            model,
            label or "none",
        )
        await self._forward(scope, receive, send, body, applied, label)

    async def _unsteered(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        payload = payload if isinstance(payload, dict) else {}
        xargs = payload.get("vllm_xargs")
        if PARAM in payload or (isinstance(xargs, dict) and XARGS_KEY in xargs):
            self.service.metrics.refusals.inc()
            error = APIError(
                400,
                f"{scope['path']} does not apply capabilities; send 'capabilities' to "
                "/v1/chat/completions or /v1/completions",
                param=PARAM,
            )
            return await error.response()(scope, receive, send)
        await self._forward(scope, receive, send, body, [], "")

    def _rewrite(self, payload: dict[str, Any]) -> list[Applied]:
        """Mutates `payload`: drops `capabilities`, strips the model suffix, adds the wire selection."""
        xargs = payload.get("vllm_xargs")
        if isinstance(xargs, dict) and XARGS_KEY in xargs:
            raise APIError(
                400,
                f"vllm_xargs.{XARGS_KEY} is reserved; select capabilities with the "
                "'capabilities' field or a '<model>+<name>' model name",
                param="vllm_xargs",
            )
        model = payload.get("model")
        field = payload.pop(PARAM, None)
        choices = parse_field(field, self.service.max_strength)
        if isinstance(model, str):
            base, suffix = split_model(model, self.service.shape.served_names)
            if suffix:
                choices += parse_model_suffix(suffix, self.service.max_strength)
        else:
            base = model
        if not choices:
            return []
        check_unique(choices)
        applied = self.service.resolve(str(base), choices)
        payload["model"] = base
        selection = sorted(a.wire for a in applied)  # (sha256, strength, mode, positions)
        payload["vllm_xargs"] = {
            **(xargs if isinstance(xargs, dict) else {}),
            XARGS_KEY: encode_selection(selection),
        }
        return applied

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, body: bytes, applied: list[Applied], label: str
    ) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        scope = {**scope, "headers": headers}
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices, as the client sends them

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start" and label:
                message = {**message, "headers": [*message.get("headers", []), (HEADER, label.encode())]}
            await send(message)

        self.service.acquire(applied)
        try:
            await self.app(scope, replay, send_with_header)
        finally:
            self.service.release(applied)
