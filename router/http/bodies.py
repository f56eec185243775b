"""Reading request bodies: JSON, and multipart as the openai SDK sends it."""

from __future__ import annotations

import re
from typing import Any

import orjson
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..errors import ApiError, invalid
from ..pipeline import Inputs
from ..pipeline.inputs import MAX_INPUT_IMAGES, check_image, check_mask

MAX_FORM_FILES = 100
_IMAGE_FIELD = re.compile(r"^image(\[\d*\])?$")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_json(request: Request) -> Any:
    if media_type(request) != "application/json":
        raise ApiError(415, "Content-Type must be application/json", code="unsupported_media_type")
    body = await request.body()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise invalid("the request body is not valid JSON", code="invalid_json") from None


async def read_object(request: Request) -> dict[str, Any]:
    """A JSON body that must be an object."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    return body


async def read_form(request: Request) -> FormData:
    if media_type(request) != "multipart/form-data":
        raise ApiError(415, "Content-Type must be multipart/form-data or application/json",
                       code="unsupported_media_type")
    try:
        # Starlette's own file cap sits well above ours so that `form_inputs` names the field.
        return await request.form(max_files=MAX_FORM_FILES, max_fields=200)
    except ApiError:
        raise
    except HTTPException as exc:
        raise invalid(f"the multipart body is malformed: {exc.detail}", code="invalid_multipart") from None
    except Exception:  # python-multipart / Starlette raise several types for a malformed body
        raise invalid("the multipart body is malformed", code="invalid_multipart") from None


async def form_inputs(form: FormData, max_pixels: int) -> tuple[Inputs, dict[str, Any]]:
    """Files as the SDK names them (`image`, `image[]`, `image[0]`…, `mask`) and the text fields."""
    inputs = Inputs()
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read()
            if _IMAGE_FIELD.match(key):
                if len(inputs.images) >= MAX_INPUT_IMAGES:
                    raise invalid(f"at most {MAX_INPUT_IMAGES} input images", "image")
                inputs.images.append(await check_image(data, "image", max_pixels))
            elif key == "mask":
                inputs.mask = await check_image(data, "mask", max_pixels)
            else:
                raise invalid(f"unexpected file field '{key}'", key, code="unknown_parameter")
        elif key in fields:
            raise invalid(f"field '{key}' was given more than once", key)
        else:
            fields[key] = value
    return check_mask(inputs), fields
