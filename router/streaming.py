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

from imagegate.providers.base import GeneratedImage, ImageRequest

from .errors import ApiError, internal_error
from .output import Finished

log = logging.getLogger("imagegate")
Produce = Callable[[], Awaitable[tuple[list[Finished], list[GeneratedImage]]]]
_USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
          "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}


def _sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def _common(req: ImageRequest, created: int) -> dict[str, Any]:
    return {"created_at": created, "quality": req.quality or "auto", "background": req.background or "auto"}


def _completed(kind: str, done: Finished, image: GeneratedImage, req: ImageRequest, created: int) -> bytes:
    return _sse({"type": f"{kind}.completed", "b64_json": done.b64, **_common(req, created),
                 "output_format": done.info.format, "size": f"{done.info.width}x{done.info.height}",
                 "seed": image.seed, "usage": _USAGE})


def _partial(kind: str, index: int, png: bytes, req: ImageRequest, created: int) -> bytes:
    return _sse({"type": f"{kind}.partial_image", "b64_json": pybase64.b64encode(png).decode("ascii"),
                 **_common(req, created), "output_format": "png", "size": req.size, "partial_image_index": index})


def _error(exc: ApiError) -> bytes:
    return _sse({"type": "error", "error": orjson.loads(exc.body())["error"]})


def _response(events: AsyncIterator[bytes], headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})


def completed_stream(operation: str, finished: list[Finished], images: list[GeneratedImage], req: ImageRequest,
                     headers: dict[str, str]) -> StreamingResponse:
    kind = "image_generation" if operation == "generate" else "image_edit"
    created = int(time.time())

    async def events() -> AsyncIterator[bytes]:
        for done, image in zip(finished, images):
            yield _completed(kind, done, image, req, created)

    return _response(events(), headers)


def live_stream(operation: str, req: ImageRequest, headers: dict[str, str], produce: Produce) -> StreamingResponse:
    """Run `produce` while streaming the previews it reports; then the completed images, or an error.

    The generation runs inside the response: a client that disconnects cancels it (Starlette stops
    the iterator), and the provider's cancellation stops the GPU at the next step.
    """
    kind = "image_generation" if operation == "generate" else "image_edit"
    created = int(time.time())
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
                finished, images = await produce()
            except ApiError as exc:
                await send.send(_error(exc))
                return
            except Exception:
                log.exception("streamed generation failed")
                await send.send(_error(internal_error()))
                return
            for done, image in zip(finished, images):
                await send.send(_completed(kind, done, image, req, created))

    async def events() -> AsyncIterator[bytes]:
        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(run)
            async for chunk in receive:
                yield chunk

    return _response(events(), headers)
