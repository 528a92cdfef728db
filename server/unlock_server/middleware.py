"""ASGI middleware: capability selection, rewritten into vLLM's request body on the steering routes and
refused on every other route.

The guard is an allowlist: `capabilities` and `vllm_xargs.unlock` are taken on `STEERING_ROUTES` only and
refused with 400 on any other route with a body, whatever routes a vLLM release adds. A hand-written wire
selection would skip the strength limit and the in-flight tracking that keeps a deleted capability
registered.

Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched, and so the in-flight
count of a streamed request lasts until its last chunk is sent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .engine import EXTRA_ARGS_KEY, encode_selection
from .errors import APIError
from .selection import PARAM, check_unique, parse_field, parse_model_suffix, split_model
from .service import Applied, CapabilityService

logger = logging.getLogger(__name__)

# The routes that apply capabilities; the concurrency limit counts the same ones.
STEERING_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
HEADER = b"x-unlock-capabilities"
XARGS = "vllm_xargs"
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


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


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands out `body` once, then what the client sends next (disconnect notices)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def parse_json(body: bytes) -> Any:
    """The body as JSON; None when it is not JSON (the route answers that in its own words)."""
    try:
        return json.loads(body)
    except ValueError:
        return None
    except RecursionError:  # json's decoder recurses per nesting level: answer it here, not with a 500
        raise APIError(400, "request body is not valid JSON: it is nested too deeply") from None


def has_wire_key(xargs: Any) -> bool:
    """Whether `vllm_xargs` holds the wire selection, as an object or as the JSON string form routes send."""
    if isinstance(xargs, str):
        try:
            xargs = json.loads(xargs)
        except (ValueError, RecursionError):
            return False
    return isinstance(xargs, dict) and EXTRA_ARGS_KEY in xargs


def reserved_key_error() -> APIError:
    return APIError(
        400,
        f"{XARGS}.{EXTRA_ARGS_KEY} is reserved; select capabilities with the 'capabilities' field or a "
        "'<model>+<name>' model name",
        param=XARGS,
    )


def check_unsteered(path: str, fields: Iterable[tuple[str, Any]]) -> None:
    """400 when a route that does not steer is sent a selection, in the body field or in the wire key."""
    for key, value in fields:
        if key == PARAM:
            raise APIError(
                400,
                f"{path} does not apply capabilities; send 'capabilities' to "
                f"{' or '.join(sorted(STEERING_ROUTES))}",
                param=PARAM,
            )
        if key == XARGS and has_wire_key(value):
            raise reserved_key_error()


async def _form_items(scope: Scope, body: bytes, receive: Receive) -> list[tuple[str, Any]]:
    """The fields of a form body (form routes take `vllm_xargs` as a JSON string); none if unparseable,
    since the route's own parser (the same Starlette one) then refuses it too."""
    request = Request(scope, _replay(body, receive))
    try:
        form = await request.form()
    except Exception:  # a malformed form: the route itself answers it
        return []
    items = [(key, value) for key, value in form.multi_items() if isinstance(value, str)]
    await form.close()
    return items


class SelectionMiddleware:
    """On the steering routes: resolves `capabilities` / `<model>+name@s` and rewrites the body into
    `vllm_xargs: {"unlock": ...}` with the plain served model name, before vLLM's handler parses it. On every
    other route with a body: refuses a selection. `exempt` paths are our own routes whose body is not a
    request to the engine (the artifact upload): streamed untouched, so its size limit acts as it arrives."""

    def __init__(self, app: ASGIApp, service: CapabilityService, exempt: frozenset[str] = frozenset()):
        self.app = app
        self.service = service
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODYLESS_METHODS or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        steering = scope["method"] == "POST" and scope["path"] in STEERING_ROUTES
        try:
            if steering:
                body, applied = self._steer(scope["path"], body)
            else:
                await self._guard(scope, body, receive)
        except APIError as err:
            return await self._refuse(err, scope, receive, send)
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        if not steering:
            return await self.app(scope, _replay(body, receive), send)
        await self._forward(scope, _replay(body, receive), send, applied)

    async def _guard(self, scope: Scope, body: bytes, receive: Receive) -> None:
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1").lower()
        if content_type.startswith(FORM_TYPES):
            return check_unsteered(scope["path"], await _form_items(scope, body, receive))
        # Any other body is read as JSON whatever its content type says: some routes parse it themselves.
        payload = parse_json(body)
        if isinstance(payload, dict):
            check_unsteered(scope["path"], payload.items())

    def _steer(self, path: str, body: bytes) -> tuple[bytes, list[Applied]]:
        payload = parse_json(body)
        if not isinstance(payload, dict):
            return body, []  # vLLM answers a body that is not a JSON object in its own words
        had_field = PARAM in payload
        model = payload.get("model")  # as asked, before the rewrite
        applied = self._rewrite(payload)
        logger.info("%s model=%s capabilities=%s", path, model, ",".join(a.label for a in applied) or "none")
        return (json.dumps(payload).encode() if applied or had_field else body), applied

    def _rewrite(self, payload: dict[str, Any]) -> list[Applied]:
        """Mutates `payload`: drops `capabilities`, strips the model suffix, adds the wire selection."""
        xargs = payload.get(XARGS)
        if has_wire_key(xargs):
            raise reserved_key_error()
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
        payload[XARGS] = {
            **(xargs if isinstance(xargs, dict) else {}),
            EXTRA_ARGS_KEY: encode_selection(selection),
        }
        return applied

    async def _forward(self, scope: Scope, receive: Receive, send: Send, applied: list[Applied]) -> None:
        """Counts the request in flight until its last byte, and echoes the selection in a header."""
        label = ",".join(a.label for a in applied).encode()

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start" and label:
                message = {**message, "headers": [*message.get("headers", []), (HEADER, label)]}
            await send(message)

        self.service.acquire(applied)
        try:
            try:
                await self.service.ready(applied)  # a change just read from another replica: one engine step
            except APIError as err:
                return await self._refuse(err, scope, receive, send)
            await self.app(scope, receive, send_with_header)
        finally:
            self.service.release(applied)

    async def _refuse(self, err: APIError, scope: Scope, receive: Receive, send: Send) -> None:
        self.service.metrics.refusals.inc()
        logger.info("%s refused: %s", scope["path"], err.message)
        await err.response()(scope, receive, send)
