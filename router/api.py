"""Everything but the image endpoints: models, uploads, artifacts, health, readiness, metrics."""

from __future__ import annotations

import hmac
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .admission import check_rate, fingerprint, idempotency_key, idempotent
from .auth import owner_id
from .errors import ApiError, invalid
from .gateway import Gateway, JSONResponse
from .inputs import check_image, decode_b64, media_type, read_form, read_json

_STARTED = int(time.time())


def _gw(request: Request, endpoint: str) -> Gateway:
    request.state.endpoint = endpoint
    return request.app.state.gateway


def _model_card(gw: Gateway, model_id: str) -> dict[str, Any]:
    model = gw.router.model(model_id)
    return {
        "id": model_id, "object": "model", "created": _STARTED, "owned_by": "imagegate",
        "aliases": model.aliases, "description": model.description,
        "capabilities": sorted(gw.router.capabilities(model_id)),
        "limits": model.limits.model_dump(), "sizes": model.sizes, "default_size": model.default_size,
        "price_per_mp": float(model.price_per_mp),
        "routes": [{"provider": r.provider, "enabled": r.provider in gw.providers} for r in model.routes],
    }


async def list_models(request: Request) -> Response:
    gw = _gw(request, "/v1/models")
    return JSONResponse({"object": "list", "data": [_model_card(gw, m) for m in gw.cfg.models]})


async def get_model(request: Request) -> Response:
    gw = _gw(request, "/v1/models/{id}")
    return JSONResponse(_model_card(gw, gw.router.resolve(request.path_params["model_id"])))


async def upload(request: Request) -> Response:
    """Store an input image (multipart `file`, or JSON `{"file": "<data URI or base64>"}`), owned by
    the caller's key; counted against its rate limit; replayed under an Idempotency-Key."""
    gw = _gw(request, "/v1/uploads")
    key = idempotency_key(request)
    if media_type(request) == "application/json":
        body = await read_json(request)
        ref = body.get("file") if isinstance(body, dict) else None
        if not isinstance(ref, str):
            raise invalid("'file' must be a data URI or base64 string", "file", code="missing_required_parameter")
        data = decode_b64(ref, "file")
    else:
        form = await read_form(request)
        part = form.get("file")
        if part is None or isinstance(part, str):
            raise invalid("multipart field 'file' with the image is required", "file",
                          code="missing_required_parameter")
        data = await part.read()
    image = await check_image(data, "file", gw.cfg.server.max_image_pixels)

    async def store() -> Response:
        await check_rate(request, gw)
        art = await gw.artifacts.put(data, content_type=image.content_type, width=image.width,
                                     height=image.height, owner=owner_id(request))
        return JSONResponse(art.public())

    return await idempotent(request, gw, key, lambda: fingerprint("/v1/uploads", None, [data]), store)


async def artifact_content(request: Request) -> Response:
    """The bytes, for the owner's key, or for anyone holding a valid signed URL."""
    gw = _gw(request, "/v1/artifacts/{id}/content")
    artifact_id = request.path_params["artifact_id"]
    expires, signature = request.query_params.get("expires"), request.query_params.get("signature")
    if expires is not None and signature is not None:
        if not gw.artifacts.check_signature(artifact_id, expires, signature):
            raise ApiError(403, "the artifact URL is invalid or has expired", code="invalid_signature")
        owner = None  # the signature is the credential: any owner's artifact
    else:
        owner = owner_id(request)
        if owner is None and gw.cfg.auth.enabled:  # never "any owner" without a key or a valid signature
            raise ApiError(401, "no API key: send `Authorization: Bearer <key>` or use a signed URL",
                           code="invalid_api_key", headers={"www-authenticate": "Bearer"})
    found = await gw.artifacts.get(artifact_id, owner)
    if found is None:
        raise ApiError(404, f"artifact '{artifact_id}' not found", code="artifact_not_found")
    art, data = found
    return Response(data, media_type=art.content_type, headers={"cache-control": "private, max-age=3600"})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when the config is loaded, the state store answers, artifacts can be stored and some
    route's circuit is not open."""
    gw: Gateway = request.app.state.gateway
    health = gw.router.health
    usable = any(health[r.provider.name].breaker.available() for m in gw.cfg.models for r in gw.router.routes[m])
    store = gw.store is not None and await gw.store.ping()
    checks = {"config": True, "state": store, "artifacts": gw.artifacts.dir.is_dir(), "routes": usable,
              "accepting": not gw.draining}
    ready = all(checks.values())
    body = {"status": "ready" if ready else "not_ready", "checks": checks, "disabled_providers": gw.disabled,
            "circuits": {name: h.breaker.state.name.lower() for name, h in health.items()}}
    return JSONResponse(body, status_code=200 if ready else 503)


async def provider_health(request: Request) -> Response:
    """Admin view: every provider instance with its circuit, load and observed latency."""
    gw = _gw(request, "/admin/providers")
    _require_admin(gw, request)
    out = {}
    for name, provider in gw.all_providers.items():
        item: dict[str, Any] = {"type": provider.kind, "enabled": name in gw.providers}
        if name in gw.disabled:
            item["disabled_reason"] = gw.disabled[name]
        if (h := gw.router.health.get(name)) is not None:
            item.update({
                "circuit": h.breaker.state.name.lower(), "consecutive_failures": h.breaker.consecutive,
                "retry_after_s": h.breaker.retry_after() if h.breaker.state.name == "OPEN" else 0,
                "in_flight": h.limiter.in_flight, "queued": h.limiter.waiting,
                "max_concurrency": h.limiter.concurrency, "max_queue": h.limiter.max_queue,
                "latency_s": h.latency.mean})
        out[name] = item
    return JSONResponse({"object": "list", "data": out})


def _require_admin(gw: Gateway, request: Request) -> None:
    key = gw.cfg.auth.admin_key
    if not key:
        raise ApiError(404, "the admin API is off: set auth.admin_key to turn it on", code="not_found")
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "the admin API needs the admin key as a bearer token", code="invalid_admin_key")


async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    if not gw.cfg.metrics.enabled:
        raise ApiError(404, "metrics are disabled", code="not_found")
    token = gw.cfg.metrics.token
    if token:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "metrics need the configured bearer token", code="invalid_token")
    data, content_type = gw.metrics.render()
    return Response(data, media_type=content_type)
