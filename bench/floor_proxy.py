"""The floor under a gateway built as imagegate is (`gateway_overhead.py --floor`): the least a
proxy on the same stack does. The server process is the same (uvicorn on uvloop with the gateway's
HTTP protocol, router/runtime.py), the app is Starlette, and the upstream client is httpx over
aiohttp with a pool as large. It forwards the POST body to the upstream and answers the
upstream's bytes unchanged. There is no validation, routing, image check, artifact, store or
metric, so whatever it costs, imagegate cannot cost less."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import uvicorn
from httpx_aiohttp import AiohttpTransport
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.procs import HOST, child_setup
from imagegate.router import runtime

POOL = 20  # the providers' default max_connections


def floor_app(upstream_url: str, key: str) -> Starlette:
    client: list[httpx.AsyncClient] = []

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL)
        async with httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=60) as made:
            client.append(made)
            yield

    async def generations(request: Request) -> Response:
        answer = await client[0].post(f"{upstream_url}/images/generations", content=await request.body(),
                                      headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
        return Response(answer.content, status_code=answer.status_code, media_type="application/json")

    async def healthz(_request: Request) -> Response:
        return Response(b"ok")

    return Starlette(routes=[Route("/v1/images/generations", generations, methods=["POST"]),
                             Route("/healthz", healthz)], lifespan=lifespan)


def floor_main(port: int, upstream_url: str, key: str) -> None:
    child_setup()
    uvicorn.run(floor_app(upstream_url, key), host=HOST, port=port, log_level="warning", access_log=False,
                **runtime.SERVER_OPTIONS)
