"""Admission control for generation requests: beyond `max_concurrent_requests` in flight, answer 429 at once.

Without a limit an overloaded server queues every request until clients time out; a fast 429 with
`Retry-After` lets clients (the openai SDK retries 429 by itself) and load balancers back off instead.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError
from .middleware import STEERING_ROUTES

RETRY_AFTER_S = 1


class ConcurrencyLimitMiddleware:
    """Counts generation requests from arrival to the last byte of their response (streams included)."""

    def __init__(self, app: ASGIApp, limit: int | None):
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.limit is None
            or scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in STEERING_ROUTES
        ):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            error = APIError(
                429,
                f"server busy: {self.in_flight} generation requests in flight, the limit is {self.limit} "
                "(--max-concurrent-requests); retry later",
            )
            response = error.response()
            response.headers["retry-after"] = str(RETRY_AFTER_S)
            return await response(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
