"""What a handler needs from the request: the services (one typed accessor), who is calling, and a
signal for the client going away."""

from __future__ import annotations

from starlette.requests import Request

from ..errors import invalid
from ..pipeline import Caller, Gone
from ..services import Services


def services(request: Request) -> Services:
    """The services the lifespan opened (app.py keeps them at `app.state.gateway`)."""
    found: Services = request.app.state.gateway
    return found


def mark(request: Request, endpoint: str) -> Services:
    """Name the endpoint for the request metrics (a template, never the raw path); the services."""
    request.state.endpoint = endpoint
    return services(request)


def caller_of(request: Request) -> Caller:
    """The key AuthMiddleware found (None with auth off), the request id, and the base URL the
    caller reaches the gateway at (`server.public_url` when set)."""
    public = services(request).cfg.server.public_url
    base = (public or _origin(request)).rstrip("/")
    return Caller(getattr(request.state, "api_key", None), getattr(request.state, "request_id", None), base)


def _origin(request: Request) -> str:
    """scheme://host as `request.url` has them, without building and parsing the whole URL (on
    every request, for the few answers that link back)."""
    host = request.headers.get("host")
    return f"{request.scope.get('scheme', 'http')}://{host}" if host else f"{request.url.scheme}://{request.url.netloc}"


def disconnected(request: Request) -> Gone:
    """Waits until the client disconnects. The body is read by then: the next ASGI message is the
    disconnect (or the end of the exchange)."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return gone


def idempotency_key(request: Request) -> str | None:
    value = request.headers.get("idempotency-key")
    if value is None:
        return None
    if not 1 <= len(value) <= 255 or not all(" " <= ch <= "~" for ch in value):
        raise invalid("Idempotency-Key must be 1 to 255 printable ASCII characters", "Idempotency-Key")
    return value
