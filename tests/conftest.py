"""Shared fixtures and helpers: real gateways and real fake upstreams, each on its own 127.0.0.1 port."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai import AsyncOpenAI, OpenAI
from PIL import Image

from imagegate.router import runtime
from imagegate.router.app import create_app
from imagegate.router.config import load_text
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.server import ServerThread

UPSTREAM_KEY = "sk-upstream-secret-123"
# Gateways shared by many misbehaviour tests in a row: the circuit breaker must not step in between them
# (tests/test_routing.py is where it is tested).
NO_BREAKER = {"circuit": {"failures": 1_000_000}}
PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}  # an API output_format → what PIL reads it as


class Gateway:
    """A running gateway: its URL, an `openai` client, a plain httpx client."""

    def __init__(self, server: ServerThread, app: Any) -> None:
        self.server, self.app = server, app
        self.url = server.url
        self.client = OpenAI(base_url=f"{self.url}/v1", api_key="test-key", max_retries=0)
        self.aclient = AsyncOpenAI(base_url=f"{self.url}/v1", api_key="test-key", max_retries=0)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    @property
    def state(self) -> Any:
        return self.app.state.gateway

    def close(self) -> None:
        self.http.close()
        self.client.close()
        self.server.stop()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


StartGateway = Callable[[dict[str, Any]], Gateway]


def serve_gateway(cfg: dict[str, Any]) -> Gateway:
    """A gateway running `cfg` (through YAML, as from a file) on a port of its own; the caller closes it."""
    app = create_app(load_text(yaml.safe_dump(cfg)))
    return Gateway(ServerThread(app, **runtime.SERVER_OPTIONS).start(), app)  # as `imagegate serve` runs it


def base_config(tmp_path: Path, upstream_url: str | None = None) -> dict[str, Any]:
    providers: dict[str, Any] = {"demo": {"type": "demo"}}
    models: dict[str, Any] = {
        "demo": {"aliases": ["demo-alias"], "price_per_mp": 0.0015,
                 "limits": {"min_side": 64, "max_side": 2048, "multiple_of": 16, "max_n": 4},
                 "routes": [{"provider": "demo", "model": "demo"}]},
    }
    if upstream_url:
        providers["up"] = {"type": "openai", "base_url": upstream_url, "api_key": UPSTREAM_KEY, **NO_BREAKER}
        models["remote"] = {"price_per_mp": 0.02, "default_size": "1024x1024",
                            "limits": {"min_side": 256, "max_side": 1536, "multiple_of": 16, "max_n": 4},
                            "defaults": {"steps": 30, "guidance_scale": 6.5},
                            "routes": [{"provider": "up", "model": "upstream-model-x"}]}
    return {"server": {"max_body_mb": 8, "request_timeout_s": 20},
            "artifacts": {"dir": str(tmp_path / "artifacts"), "ttl_hours": 1},
            "state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
            "providers": providers, "models": models, "default_model": "demo",
            "auto": {"policy": "priority", "candidates": ["demo"]}}


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture
def start_gateway() -> Iterator[StartGateway]:
    started: list[Gateway] = []

    def start(cfg: dict[str, Any]) -> Gateway:
        started.append(serve_gateway(cfg))
        return started[-1]

    yield start
    for gw in started:
        gw.close()


@pytest.fixture
def gateway(tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway) -> Gateway:
    return start_gateway(base_config(tmp_path, fake_openai.base_url))


# -- helpers shared by the test modules ----------------------------------------------------------

def sdk(gw: Gateway) -> OpenAI:
    """The gateway's client with a client-side timeout, so that a hang fails the test instead of stalling it."""
    return gw.client.with_options(timeout=30)


def checked_error(err: openai.APIStatusError, status: int, *hidden: str) -> openai.APIStatusError:
    """Assert `err` is an OpenAI-shaped error with `status` whose body contains none of `hidden`."""
    assert err.status_code == status, err.response.text
    for text in hidden:
        assert text not in err.response.text
    assert set(err.response.json()["error"]) == {"message", "type", "param", "code"}
    return err


def expect_error(call: Callable[[], Any], status: int, *hidden: str) -> openai.APIStatusError:
    """Run `call`, expect an APIStatusError, and check it with `checked_error`."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return checked_error(info.value, status, *hidden)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes(width: int = 64, height: int = 64, color: tuple[int, ...] = (10, 20, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def free_port() -> int:
    """A 127.0.0.1 port nobody listens on now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def leave_once(gw: Gateway, body: dict[str, Any], reached: Callable[[], bool], what: str) -> None:
    """POST a generation, and drop the connection (the client is gone) once `reached()` says the
    gateway got far enough — a condition, not a guessed time."""

    async def go() -> None:
        async with httpx.AsyncClient(base_url=gw.url, headers={"authorization": "Bearer test-key"},
                                     timeout=30) as client:
            call = asyncio.create_task(client.post("/v1/images/generations", json=body))
            deadline = time.monotonic() + 10
            while not reached():
                assert not call.done(), call.result().text
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.02)
            call.cancel()  # drops the connection
            with pytest.raises(asyncio.CancelledError):
                await call

    asyncio.run(go())


def wait_until_healthy(proc: subprocess.Popen[bytes], url: str, why: Callable[[], str] = lambda: "",
                       timeout: float = 60) -> None:
    """Poll `url`/healthz until it answers; fail (with `why()`, e.g. the server's log) if the process
    exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{why()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"the server did not become healthy:\n{why()}")
