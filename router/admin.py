"""The admin API for keys, guarded by `auth.admin_key`: the HTTP twin of `imagegate keys …`."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .api import _require_admin
from .errors import ApiError, invalid
from .gateway import Gateway, JSONResponse
from .inputs import read_json
from .state import KeyNotFound, StateError, Store, usd_to_micros

_CREATE_FIELDS = {"name", "credits", "models", "rpm", "concurrency"}


def routes() -> list[Route]:
    return [
        Route("/admin/keys", create_key, methods=["POST"]),
        Route("/admin/keys", list_keys, methods=["GET"]),
        Route("/admin/keys/{key_id}/revoke", revoke_key, methods=["POST"]),
        Route("/admin/keys/{key_id}/topup", topup_key, methods=["POST"]),
    ]


def _admin(request: Request, endpoint: str) -> tuple[Gateway, Store]:
    request.state.endpoint = endpoint
    gw: Gateway = request.app.state.gateway
    _require_admin(gw, request)
    if gw.store is None:
        raise ApiError(503, "the state store is not open", code="state_unavailable", retry_after=1)
    return gw, gw.store


async def _object(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    return body


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


def _models(gw: Gateway, value: Any) -> list[str] | None:
    """Aliases are stored as the model ids they name: the check at request time sees resolved ids."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid("'models' must be a list of model ids", "models")
    try:
        return [gw.router.resolve(name) for name in value]
    except ApiError as exc:
        raise invalid(exc.message, "models", code="model_not_found") from None


async def create_key(request: Request) -> Response:
    gw, store = _admin(request, "/admin/keys")
    body = await _object(request)
    unknown = sorted(set(body) - _CREATE_FIELDS)
    if unknown:
        raise invalid(f"unknown field '{unknown[0]}'", unknown[0], code="unknown_parameter")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise invalid("'name' is required", "name", code="missing_required_parameter")
    credits = None if body.get("credits") is None else _credits(body["credits"], allow_zero=True)
    try:
        record, secret = await store.create_key(name, credits, _models(gw, body.get("models")),
                                                _limit(body, "rpm"), _limit(body, "concurrency"))
    except StateError as exc:
        raise invalid(str(exc)) from None
    # The only time the secret is shown: the store keeps its hash.
    return JSONResponse({**record.public(), "key": secret}, status_code=201)


async def list_keys(request: Request) -> Response:
    _, store = _admin(request, "/admin/keys")
    return JSONResponse({"object": "list", "data": [k.public() for k in await store.list_keys()]})


async def revoke_key(request: Request) -> Response:
    _, store = _admin(request, "/admin/keys/{id}/revoke")
    try:
        record = await store.revoke(request.path_params["key_id"])
    except KeyNotFound as exc:
        raise ApiError(404, str(exc), code="key_not_found") from None
    return JSONResponse(record.public())


async def topup_key(request: Request) -> Response:
    _, store = _admin(request, "/admin/keys/{id}/topup")
    body = await _object(request)
    if "credits" not in body:
        raise invalid("'credits' is required", "credits", code="missing_required_parameter")
    micros = _credits(body["credits"], allow_zero=False)
    reference = body.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise invalid("'reference' must be a string", "reference")
    try:
        record = await store.topup(request.path_params["key_id"], micros, reference)
    except KeyNotFound as exc:
        raise ApiError(404, str(exc), code="key_not_found") from None
    except StateError as exc:
        raise invalid(str(exc), "credits", code="key_unlimited") from None
    return JSONResponse(record.public())
