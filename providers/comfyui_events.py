"""ComfyUI's event socket: one WebSocket per provider instance (`/ws?clientId=…`), shared by all
of its prompts. Progress, previews and completion reach the waiter of each prompt id; when the
socket is down or quiet, the waiter falls back on polling /history (docs/providers.md §9)."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from PIL import Image

log = logging.getLogger("imagegate")
PREVIEW_IMAGE = 1  # the binary frame's event type; its second word is the format (1 JPEG, 2 PNG)
RECONNECT_S = (0.2, 5.0)


@dataclass
class Outcome:
    status: str  # success | error | interrupted
    error: dict[str, Any] = field(default_factory=dict)  # execution_error's data
    outputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # node → images, from `executed`


@dataclass
class Waiter:
    """One prompt's end, and where its progress and previews go."""

    on_progress: Callable[[int, int], None] | None = None
    on_preview: Callable[[bytes], None] | None = None
    preview_size: tuple[int, int] | None = None  # ComfyUI's latent previews come at its own size
    outputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ended: asyncio.Future[Outcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def end(self, outcome: Outcome) -> None:
        if not self.ended.done():
            self.ended.set_result(outcome)


class EventSocket:
    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url, self.headers = url, headers
        self.waiters: dict[str, Waiter] = {}
        self.running: str | None = None  # the prompt of ours ComfyUI is executing (previews carry no id)
        self.queue_remaining: int | None = None
        self.progress: tuple[int, int] | None = None  # the running prompt's step, of steps
        self.connected = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def expect(self, prompt_id: str, waiter: Waiter) -> Waiter:
        self.waiters[prompt_id] = waiter
        return waiter

    def forget(self, prompt_id: str) -> None:
        self.waiters.pop(prompt_id, None)
        if self.running == prompt_id:
            self.running, self.progress = None, None

    async def _run(self) -> None:
        delay = RECONNECT_S[0]
        async with aiohttp.ClientSession(headers=self.headers) as session:
            while True:
                try:
                    async with session.ws_connect(self.url, heartbeat=30) as socket:
                        self.connected, delay = True, RECONNECT_S[0]
                        async for message in socket:
                            self._read(message)
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    log.debug("comfyui socket %s: %s", self.url.split("?")[0], type(exc).__name__)
                finally:
                    self.connected = False
                await asyncio.sleep(delay)  # the waiters poll /history meanwhile
                delay = min(RECONNECT_S[1], delay * 2)

    def _read(self, message: aiohttp.WSMessage) -> None:
        if message.type == aiohttp.WSMsgType.BINARY:
            self._preview(message.data)
        elif message.type == aiohttp.WSMsgType.TEXT:
            try:
                event = orjson.loads(message.data)
            except orjson.JSONDecodeError:
                return
            if isinstance(event, dict) and isinstance(event.get("data"), dict):
                self._event(str(event.get("type")), event["data"])

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "status":
            remaining = data.get("status", {}).get("exec_info", {}).get("queue_remaining")
            self.queue_remaining = remaining if isinstance(remaining, int) else self.queue_remaining
            return
        waiter = self.waiters.get(str(data.get("prompt_id")))
        if waiter is None:
            return  # another client's, or a prompt we gave up on
        prompt_id = str(data["prompt_id"])
        if kind == "execution_start":
            self.running = prompt_id
        elif kind == "progress":
            value, total = data.get("value"), data.get("max")
            if isinstance(value, int) and isinstance(total, int):
                self.progress = (value, total)
                if waiter.on_progress is not None:
                    waiter.on_progress(value, total)
        elif kind == "executed" and isinstance(images := (data.get("output") or {}).get("images"), list):
            waiter.outputs[str(data.get("node"))] = images
        elif kind == "execution_success" or (kind == "executing" and data.get("node") is None):
            # ComfyUI sends execution_success before it writes /history (main.py: execute, then
            # task_done), so the outputs come from `executed` events rather than from /history.
            waiter.end(Outcome("success", outputs=waiter.outputs))
        elif kind == "execution_error":
            waiter.end(Outcome("error", data))
        elif kind == "execution_interrupted":
            waiter.end(Outcome("interrupted"))

    def _preview(self, frame: bytes) -> None:
        if len(frame) < 8 or int.from_bytes(frame[:4], "big") != PREVIEW_IMAGE or self.running is None:
            return
        waiter = self.waiters.get(self.running)
        if waiter is None or waiter.on_preview is None:
            return
        try:
            image = Image.open(io.BytesIO(frame[8:])).convert("RGB")
            if waiter.preview_size is not None and image.size != waiter.preview_size:
                image = image.resize(waiter.preview_size, Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, "PNG", compress_level=1)  # previews go out as PNG
        except Exception:  # a broken preview is not worth a failed prompt
            return
        waiter.on_preview(buffer.getvalue())
