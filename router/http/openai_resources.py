"""The OpenAI surface's other resources: models, uploads, artifacts and the caller's usage."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from ..errors import invalid
from ..pipeline import Reply, fingerprint
from ..pipeline.inputs import decode_b64
from .bodies import media_type, read_form, read_json
from .context import caller_of, idempotency_key, mark
from .responses import JSONResponse, reply_response


async def list_models(request: Request) -> Response:
    catalog = mark(request, "/v1/models").pipeline.catalog
    return JSONResponse({"object": "list", "data": [catalog.card(m) for m in catalog.ids()]})


async def get_model(request: Request) -> Response:
    catalog = mark(request, "/v1/models/{id}").pipeline.catalog
    return JSONResponse(catalog.card(request.path_params["model_id"]))


async def _upload_bytes(request: Request) -> bytes:
    """Multipart `file`, or JSON `{"file": "<data URI or base64>"}`."""
    if media_type(request) == "application/json":
        body = await read_json(request)
        ref = body.get("file") if isinstance(body, dict) else None
        if not isinstance(ref, str):
            raise invalid("'file' must be a data URI or base64 string", "file", code="missing_required_parameter")
        return decode_b64(ref, "file")
    form = await read_form(request)
    part = form.get("file")
    if part is None or isinstance(part, str):
        raise invalid("multipart field 'file' with the image is required", "file", code="missing_required_parameter")
    return await part.read()


async def upload(request: Request) -> Response:
    """Store an input image, owned by the caller's key; counted against its rate limit; replayed
    under an Idempotency-Key."""
    pipeline, caller = mark(request, "/v1/uploads").pipeline, caller_of(request)
    key = idempotency_key(request)
    data = await _upload_bytes(request)
    image = await pipeline.check_image(data, "file")

    async def store() -> Reply:
        return Reply.json((await pipeline.upload(data, image, caller)).public())

    reply = await pipeline.idempotent(caller, key, lambda: fingerprint("/v1/uploads", None, [data]), store)
    return reply_response(reply)


async def artifact_content(request: Request) -> Response:
    """The bytes, for the owner's key, or for anyone holding a valid signed URL."""
    pipeline = mark(request, "/v1/artifacts/{id}/content").pipeline
    query = request.query_params
    art, data = await pipeline.artifact(request.path_params["artifact_id"], caller_of(request),
                                        query.get("expires"), query.get("signature"))
    return Response(data, media_type=art.content_type, headers={"cache-control": "private, max-age=3600"})


async def usage(request: Request) -> Response:
    """GET /v1/usage: the caller's balance and their latest ledger entries (most recent first)."""
    services = mark(request, "/v1/usage")
    return JSONResponse(await services.accounts.usage(caller_of(request)))
