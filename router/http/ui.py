"""The web page: a playground and an operator console at /ui/, plain static files shipped in the
package (router/http/static/). The page uses only the public API, like any other client.

Every /ui response carries a strict Content-Security-Policy: scripts, styles and connections from
this origin only, images from it or blob: URLs, no framing, and Trusted Types required, so no
string can ever become markup (the page writes text with textContent, never innerHTML).
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from ..errors import ApiError

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' blob:; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'; require-trusted-types-for 'script'; "
       "trusted-types 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
           "x-frame-options": "DENY", "cache-control": "no-cache"}
TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
PAGES = {"": "index.html", "admin": "admin.html"}


def _static() -> dict[str, bytes]:
    """Every shipped file by name, read once: only these names are ever served (no paths)."""
    folder = resources.files("imagegate.router.http").joinpath("static")
    return {f.name: f.read_bytes() for f in folder.iterdir()
            if f.is_file() and any(f.name.endswith(ext) for ext in TYPES)}


FILES = _static()


def _file(name: str) -> Response:
    data = FILES.get(name)
    if data is None:
        raise ApiError(404, f"no file '{name}' in the web page", code="not_found")
    media = next(kind for ext, kind in TYPES.items() if name.endswith(ext))
    return Response(data, headers=HEADERS, media_type=media)


async def page(request: Request) -> Response:
    name = request.path_params.get("name", "")
    return _file(PAGES.get(name, name))


async def to_ui(request: Request) -> Response:
    # Relative ("ui/" from "/" and from "/ui" alike): the page also works behind a path prefix.
    return RedirectResponse("ui/", status_code=307)


def routes() -> list[Route]:
    return [Route("/", to_ui, methods=["GET"]), Route("/ui", to_ui, methods=["GET"]),
            Route("/ui/", page, methods=["GET"]), Route("/ui/{name}", page, methods=["GET"])]
