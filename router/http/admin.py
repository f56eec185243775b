"""The admin API, guarded by `auth.admin_key`: provider health, and keys (the HTTP twin of
`imagegate keys …`)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..errors import ApiError, invalid
from ..money import usd_to_micros
from ..services import Services
from .bodies import media_type, read_object
from .context import mark
from .health import bearer_matches
from .responses import JSONResponse

_CREATE_FIELDS = {"name", "credits", "models", "rpm", "concurrency"}


def _admin(request: Request, endpoint: str) -> Services:
    services = mark(request, endpoint)
    if request.method != "GET":
        _same_site(request)
        # No form a page could post (forms always say their type); a body-less call from a script or
        # the CLI's twin says none, and the Origin check above covers browsers.
        if media_type(request) not in ("", "application/json"):
            raise ApiError(415, "admin writes need Content-Type: application/json", code="unsupported_media_type")
    key = services.cfg.auth.admin_key
    if not key:
        raise ApiError(404, "the admin API is off: set auth.admin_key to turn it on", code="not_found")
    if not bearer_matches(request, key):
        raise ApiError(401, "the admin API needs the admin key as a bearer token", code="invalid_admin_key")
    return services


def _same_site(request: Request) -> None:
    """A write must come from this origin: a browser says where a request comes from, and a page
    elsewhere must not drive an admin's console (the admin key is only half of it)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise ApiError(403, "cross-site admin writes are refused", code="cross_site_request")
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise ApiError(403, "cross-origin admin writes are refused", code="cross_site_request")


def _credits(value: Any, *, allow_zero: bool) -> int:
    """USD as a JSON string ("12.50", exact) or number; stored as micro-dollars."""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise invalid("'credits' must be an amount in USD, e.g. \"12.50\"", "credits")
    try:
        return usd_to_micros(value, allow_zero=allow_zero)
    except ValueError as exc:
        raise invalid(str(exc), "credits") from None


def _limit(body: dict[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise invalid(f"'{field}' must be a whole number of at least 1", field)
    return value


def _models(value: Any) -> list[str] | None:
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
        raise invalid("'models' must be a list of model ids", "models")
    return value


async def provider_health(request: Request) -> Response:
    """Every provider instance with its circuit, load and observed latency."""
    services = _admin(request, "/admin/providers")
    return JSONResponse({"object": "list", "data": services.provider_report()})


async def usage_by_model(request: Request) -> Response:
    """Images, megapixels and cost delivered per model, from this gateway's own counters."""
    services = _admin(request, "/admin/usage")
    return JSONResponse({"object": "list", "data": services.metrics.delivered_by_model()})


async def create_key(request: Request) -> Response:
    accounts = _admin(request, "/admin/keys").accounts
    body = await read_object(request)
    unknown = sorted(set(body) - _CREATE_FIELDS)
    if unknown:
        raise invalid(f"unknown field '{unknown[0]}'", unknown[0], code="unknown_parameter")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise invalid("'name' is required", "name", code="missing_required_parameter")
    credits = None if body.get("credits") is None else _credits(body["credits"], allow_zero=True)
    models = _models(body.get("models"))
    ids = accounts.model_ids(models) if models is not None else None
    record, secret, webhook_secret = await accounts.create_key(name, credits, ids, _limit(body, "rpm"),
                                                               _limit(body, "concurrency"))
    # The only time the secrets are shown: the store keeps the key's hash.
    return JSONResponse({**record.public(), "key": secret, "webhook_secret": webhook_secret}, status_code=201)


async def rotate_webhook_secret(request: Request) -> Response:
    """A new signing secret for the key's webhooks, shown this once; the old one stops at once."""
    accounts = _admin(request, "/admin/keys/{id}/webhook-secret").accounts
    key_id = request.path_params["key_id"]
    return JSONResponse({"id": key_id, "webhook_secret": await accounts.rotate_webhook_secret(key_id)})


async def list_keys(request: Request) -> Response:
    accounts = _admin(request, "/admin/keys").accounts
    return JSONResponse({"object": "list", "data": [k.public() for k in await accounts.list_keys()]})


async def revoke_key(request: Request) -> Response:
    accounts = _admin(request, "/admin/keys/{id}/revoke").accounts
    return JSONResponse((await accounts.revoke(request.path_params["key_id"])).public())


async def topup_key(request: Request) -> Response:
    accounts = _admin(request, "/admin/keys/{id}/topup").accounts
    body = await read_object(request)
    if "credits" not in body:
        raise invalid("'credits' is required", "credits", code="missing_required_parameter")
    micros = _credits(body["credits"], allow_zero=False)
    reference = body.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise invalid("'reference' must be a string", "reference")
    return JSONResponse((await accounts.topup(request.path_params["key_id"], micros, reference)).public())
