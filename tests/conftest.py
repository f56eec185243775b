"""Shared fixtures: real gateways and real fake upstreams, each on its own 127.0.0.1 port."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openai import AsyncOpenAI, OpenAI
from PIL import Image

from router.app import create_app
from router.config import load_text
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.server import ServerThread

UPSTREAM_KEY = "sk-upstream-secret-123"


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


def base_config(tmp_path: Path, upstream_url: str | None = None) -> dict[str, Any]:
    providers: dict[str, Any] = {"demo": {"type": "demo"}}
    models: dict[str, Any] = {
        "demo": {"aliases": ["demo-alias"], "price_per_mp": 0.0015,
                 "limits": {"min_side": 64, "max_side": 2048, "multiple_of": 16, "max_n": 4},
                 "routes": [{"provider": "demo", "model": "demo"}]},
    }
    if upstream_url:
        providers["up"] = {"type": "openai", "base_url": upstream_url, "api_key": UPSTREAM_KEY}
        models["remote"] = {"price_per_mp": 0.02, "default_size": "1024x1024",
                            "limits": {"min_side": 256, "max_side": 1536, "multiple_of": 16, "max_n": 4},
                            "defaults": {"steps": 30, "guidance_scale": 6.5},
                            "routes": [{"provider": "up", "model": "upstream-model-x"}]}
    return {"server": {"max_body_mb": 8, "request_timeout_s": 20},
            "artifacts": {"dir": str(tmp_path / "artifacts"), "ttl_hours": 1},
            "providers": providers, "models": models, "default_model": "demo",
            "auto": {"policy": "priority", "candidates": ["demo"]}}


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI(UPSTREAM_KEY).start()
    yield fake
    fake.stop()


@pytest.fixture
def start_gateway() -> Iterator[Callable[[dict[str, Any]], Gateway]]:
    started: list[Gateway] = []

    def start(cfg: dict[str, Any]) -> Gateway:
        app = create_app(load_text(yaml.safe_dump(cfg)))
        gw = Gateway(ServerThread(app).start(), app)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.close()


@pytest.fixture
def gateway(tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: Callable[[dict[str, Any]], Gateway]) -> Gateway:
    return start_gateway(base_config(tmp_path, fake_openai.base_url))


def png_bytes(width: int = 64, height: int = 64, color: tuple[int, ...] = (10, 20, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img
