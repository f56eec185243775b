"""`stream: true`: server-sent events as OpenAI sends them.

Upstreams that cannot preview give one `*.completed` event per image once the images are ready.
When the client asks for `partial_images` the generation runs while the stream is open and each
preview the provider reports becomes a `*.partial_image` event as it arrives (the local diffusers
backend decodes them from the latents); a failure after the stream has begun is an `error` event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import orjson
import pybase64
from starlette.responses import StreamingResponse

from imagegate.providers.base import ImageRequest

from ..errors import ApiError, internal_error
from ..pipeline import DeliveredImage, Generation, image_item

log = logging.getLogger("imagegate")
Produce = Callable[[], Awaitable[Generation]]
_USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
          "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}


def _sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def _common(req: ImageRequest, created: int) -> dict[str, Any]:
    return {"created_at": created, "quality": req.quality or "auto", "background": req.background or "auto"}


def _completed(kind: str, image: DeliveredImage, req: ImageRequest, created: int) -> bytes:
    return _sse({"type": f"{kind}.completed", **image_item(image, b64_json=image.b64), **_common(req, created),
                 "output_format": image.info.format, "size": f"{image.info.width}x{image.info.height}",
                 "usage": _USAGE})


def _partial(kind: str, index: int, png: bytes, req: ImageRequest, created: int) -> bytes:
    return _sse({"type": f"{kind}.partial_image", "b64_json": pybase64.b64encode(png).decode("ascii"),
                 **_common(req, created), "output_format": "png", "size": req.size, "partial_image_index": index})


def _error(exc: ApiError) -> bytes:
    return _sse({"type": "error", "error": exc.payload()})


def _response(events: AsyncIterator[bytes], headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})


def _kind(req: ImageRequest) -> str:
    return "image_generation" if req.operation == "generate" else "image_edit"


def completed_stream(generation: Generation, headers: dict[str, str]) -> StreamingResponse:
    req = generation.prepared.request
    kind, created = _kind(req), int(time.time())

    async def events() -> AsyncIterator[bytes]:
        for image in generation.images:
            yield _completed(kind, image, req, created)

    return _response(events(), headers)


def live_stream(req: ImageRequest, headers: dict[str, str], produce: Produce) -> StreamingResponse:
    """Run `produce` while streaming the previews it reports; then the completed images, or an error.

    The generation runs inside the response: a client that disconnects cancels it (Starlette stops
    the iterator), and the provider's cancellation stops the GPU at the next step.
    """
    kind, created = _kind(req), int(time.time())
    send, receive = anyio.create_memory_object_stream[bytes](max_buffer_size=16)

    def on_partial(index: int, png: bytes) -> None:
        try:
            send.send_nowait(_partial(kind, index, png, req, created))
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # a slow reader misses a preview rather than slowing the GPU

    req.on_partial = on_partial

    async def run() -> None:
        async with send:
            try:
                generation = await produce()
            except ApiError as exc:
                await send.send(_error(exc))
                return
            except Exception:
                log.exception("streamed generation failed")
                await send.send(_error(internal_error()))
                return
            for image in generation.images:
                await send.send(_completed(kind, image, req, created))

    async def events() -> AsyncIterator[bytes]:
        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(run)
            async for chunk in receive:
                yield chunk

    return _response(events(), headers)
