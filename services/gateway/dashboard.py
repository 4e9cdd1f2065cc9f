"""The dashboard: one page and its assets, served by the gateway itself (nothing from elsewhere,
so it works offline). The page is open; it signs in with an API key and then calls the API,
which stays protected, with the short-lived cookie."""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
ASSETS_PATH = "/assets"

# What needs no key: the page and its assets (every call it makes to the API does).
OPEN_PATHS = {"/", "/favicon.ico"}
OPEN_PREFIXES = (f"{ASSETS_PATH}/",)

# Only the gateway's own scripts, styles and streams: no inline script, nothing from elsewhere.
_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


@cache
def _page(api_prefix: str) -> str:
    return (STATIC / "index.html").read_text().replace("{{API_PREFIX}}", html.escape(api_prefix))


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(
        _page(request.app.state.settings.api_prefix),
        headers={"Content-Security-Policy": _POLICY, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


async def favicon(request: Request) -> FileResponse:
    """The icon browsers ask for by this name on any page of the gateway (the API docs, a JSON
    answer), not only the dashboard, whose page names its SVG."""
    return FileResponse(STATIC / "favicon.ico", media_type="image/x-icon", headers={"Cache-Control": "max-age=86400"})


def routes() -> list[Route | Mount]:
    return [
        Route("/", page, methods=["GET"], include_in_schema=False),
        Route("/favicon.ico", favicon, methods=["GET"], include_in_schema=False),
        Mount(ASSETS_PATH, app=StaticFiles(directory=STATIC), name="dashboard-assets"),
    ]
