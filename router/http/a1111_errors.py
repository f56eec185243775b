"""Errors in the shapes AUTOMATIC1111's API answers with: FastAPI's 422 for a bad field, and
A1111's own `{"error", "detail", "body", "errors"}` for everything else, with /v1's statuses."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from ..errors import ApiError

PREFIXES = ("/sdapi/", "/v2/automatic1111/")
# The pipeline names fields as /v1 does; an A1111 client knows them by these.
_FIELDS = {"size": "width", "n": "batch_size", "guidance_scale": "cfg_scale", "strength": "denoising_strength",
           "image": "init_images", "model": "override_settings.sd_model_checkpoint"}


def speaks_a1111(path: str) -> bool:
    return path.startswith(PREFIXES)


def a1111_error_response(exc: ApiError) -> Response:
    body: dict[str, Any]
    if exc.status in (400, 422) and exc.param:
        loc = ["body", *_FIELDS.get(exc.param, exc.param).split(".")]
        body = {"detail": [{"loc": loc, "msg": exc.message, "type": exc.code or "value_error"}]}
        status = 422
    else:
        body = {"error": exc.code or "HTTPException", "detail": exc.message, "body": "", "errors": exc.message}
        status = exc.status
    return Response(orjson.dumps(body), status_code=status, headers=exc.headers, media_type="application/json")
