"""`GET /playground`: a page to try capabilities in a browser, served from static files in the package.

The files carry no data and are served without a key (a browser cannot add a header to a page navigation);
everything the page shows comes from the public API, which it calls with the key the person enters, so it
sees exactly what any client gets. A Content-Security-Policy allows scripts, styles, images and requests
from this origin only: no inline script, no other origin.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from .errors import APIError

STATIC = Path(__file__).with_name("static")
PAGE = "playground.html"
ASSETS = {  # the only files served: no path from the URL ever reaches the filesystem
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@lru_cache(maxsize=len(ASSETS) + 1)
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@router.get("/playground")
async def page() -> Response:
    return Response(_read(PAGE), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/playground/{asset}")
async def asset(asset: str) -> Response:
    media_type = ASSETS.get(asset)
    if media_type is None:
        raise APIError(404, f"no playground file {asset!r}", param="asset")
    return Response(_read(asset), media_type=media_type, headers=HEADERS)
