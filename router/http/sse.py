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
import pybase64
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import ApiError, internal_error
from ..pipeline import DeliveredImage, Generation, Prepared, image_item, json_bytes

log = logging.getLogger("imagegate")
Produce = Callable[[], Awaitable[Generation]]
_USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
          "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}


def _sse(event: dict[str, Any]) -> bytes:
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + json_bytes(event) + b"\n\n"


def _common(prepared: Prepared, created: int) -> dict[str, Any]:
    req = prepared.request
    return {"created_at": created, "quality": req.quality or "auto", "background": req.background or "auto"}


def _completed(kind: str, image: DeliveredImage, generation: Generation, created: int) -> bytes:
    # OpenAI's event, plus who served it and what the request cost (a stream has no headers to say it after).
    served = {"model": generation.prepared.model_id, "provider": generation.provider,
              "fallback": generation.fallback, "cost": float(generation.delivered.price.cost)}
    return _sse({"type": f"{kind}.completed", **image_item(image, b64_json=image.b64),
                 **_common(generation.prepared, created), "output_format": image.info.format,
                 "size": f"{image.info.width}x{image.info.height}", "usage": _USAGE, "imagegate": served})


def _partial(kind: str, index: int, png: bytes, prepared: Prepared, created: int) -> bytes:
    return _sse({"type": f"{kind}.partial_image", "b64_json": pybase64.b64encode(png).decode("ascii"),
                 **_common(prepared, created), "output_format": "png", "size": prepared.request.size,
                 "partial_image_index": index})


def _error(exc: ApiError) -> bytes:
    return _sse({"type": "error", "error": exc.payload()})


def _response(events: AsyncIterator[bytes], headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})


def _kind(prepared: Prepared) -> str:
    return "image_generation" if prepared.request.operation == "generate" else "image_edit"


def completed_stream(generation: Generation, headers: dict[str, str]) -> StreamingResponse:
    prepared = generation.prepared
    kind, created = _kind(prepared), int(time.time())

    async def events() -> AsyncIterator[bytes]:
        for image in generation.images:
            yield _completed(kind, image, generation, created)

    return _response(events(), headers)


class _ClosingStream(StreamingResponse):
    """Runs `closed` once the response is over, however it ended (finished, failed, client gone)."""

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str],
                 closed: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
        self.closed = closed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.closed()


def live_stream(prepared: Prepared, headers: dict[str, str], produce: Produce,
                closed: Callable[[], Awaitable[None]]) -> StreamingResponse:
    """Run `produce` while streaming the previews it reports; then the completed images, or an error.
    `closed` runs once the response is over, however it ended.

    The generation runs inside the response: a client that disconnects cancels it (Starlette stops
    the iterator), and the provider's cancellation stops the GPU at the next step.
    """
    kind, created = _kind(prepared), int(time.time())
    send, receive = anyio.create_memory_object_stream[bytes](max_buffer_size=16)

    def on_partial(index: int, png: bytes) -> None:
        try:
            send.send_nowait(_partial(kind, index, png, prepared, created))
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # a slow reader misses a preview rather than slowing the GPU

    prepared.request.on_partial = on_partial

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
                await send.send(_completed(kind, image, generation, created))

    async def events() -> AsyncIterator[bytes]:
        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(run)
            async for chunk in receive:
                yield chunk

    return _ClosingStream(events(), headers, closed)
