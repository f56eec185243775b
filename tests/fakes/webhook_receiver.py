"""A webhook receiver on 127.0.0.1: records every POST (headers, body) and answers from a script
(status, headers, delay) per path, then 200. What a client's endpoint for imagegate's webhooks is."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.server import FakeUpstream


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


class WebhookReceiver(FakeUpstream):
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.script: dict[str, list[Answer]] = {}
        self.delay_s = 0.0  # every answer waits this long (to widen races between replicas)
        self._lock = threading.Lock()
        self.app = Starlette(routes=[Route("/{path:path}", self._receive, methods=["POST"])])

    def answer(self, path: str, *answers: Answer) -> None:
        with self._lock:
            self.script[path] = list(answers)

    def at(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def hook(self, path: str) -> str:
        return f"{self.url}/{path}"

    async def _receive(self, request: Request) -> Response:
        path = request.path_params["path"]
        body = await request.body()
        with self._lock:
            self.received.append(Received(path, dict(request.headers), body, time.time()))
            script = self.script.get(path) or []
            reply = script.pop(0) if script else Answer()
        await asyncio.sleep(reply.delay_s + self.delay_s)
        return Response(b"", status_code=reply.status, headers=reply.headers)

    def wait(self, path: str, count: int, timeout: float = 20) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(found := self.at(path)) < count:
            assert time.monotonic() < deadline, f"{path}: {len(found)} of {count} deliveries came"
            time.sleep(0.02)
        return found
