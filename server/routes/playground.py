"""The playground: a page the server serves itself (``/playground``; ``/`` redirects there) from static files in
the ``server`` package (no build step, nothing from the internet). The page only calls this server's API, with
the key typed into it as a bearer token; its responses carry a strict Content-Security-Policy (scripts, styles and
connections to this origin only, no framing). Not part of the API, so not in the OpenAPI document."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from server.errors import APIError

STATIC = Path(__file__).resolve().parent.parent / "playground"
ASSETS = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}
"""The files besides the page (a fixed set: no path from the request reaches the filesystem)."""
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("playground", status_code=307)  # relative: works behind a path prefix too


@router.get("/playground")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/playground/{asset}")
async def asset(asset: str) -> FileResponse:
    if asset not in ASSETS:
        raise APIError(404, f"no such file: /playground/{asset}")
    return FileResponse(STATIC / asset, media_type=ASSETS[asset], headers=HEADERS)
