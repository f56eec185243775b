"""A real browser for the web page's tests: Debian's Chromium driven by Playwright (its own
browser download cannot work here), against a live gateway on 127.0.0.1."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import NO_BREAKER, Gateway, base_config, free_port, serve_gateway
from tests.fakes.openai_upstream import FakeOpenAI

ADMIN = "admin-secret-for-the-page"

sync_api = pytest.importorskip("playwright.sync_api")
if shutil.which("chromium") is None:  # `make test` installs it: without it, say so rather than pass
    pytest.fail("the `chromium` package is needed for the browser tests (make test installs it)", pytrace=False)


# Per module, not per session: Playwright's sync API keeps an event loop running on this thread
# while it is open, and tests after these ones run their own (asyncio.run).
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
        launched = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        yield launched
        launched.close()


def page_config(tmp: Path, upstream_url: str) -> dict[str, Any]:
    cfg = base_config(tmp, upstream_url)
    cfg["auth"] = {"enabled": True, "admin_key": ADMIN}
    # A route to a port nobody listens on: it fails, and its circuit opens at the first failure.
    cfg["providers"]["down"] = {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "api_key": "k",
                                "circuit": {"failures": 1, "cooldown_s": 3600}}
    cfg["models"]["broken"] = {"price_per_mp": 0.01, "limits": {"min_side": 256, "max_side": 1536, "multiple_of": 16},
                               "routes": [{"provider": "down", "model": "x"}]}
    cfg["providers"]["up"].update(NO_BREAKER)
    cfg["providers"]["demo"]["previews"] = True
    return cfg


class Site:
    """The gateway, a key with credit, and helpers to read the key's ledger."""

    def __init__(self, gateway: Gateway, upstream: FakeOpenAI) -> None:
        self.gateway, self.upstream, self.url = gateway, upstream, gateway.url
        made = gateway.http.post("/admin/keys", json={"name": "person", "credits": "10.00"},
                                 headers={"authorization": f"Bearer {ADMIN}"})
        self.key = made.json()["key"]

    def usage(self) -> dict[str, Any]:
        seen = httpx.get(f"{self.url}/v1/usage", headers={"authorization": f"Bearer {self.key}"}, timeout=10).json()
        assert sum(e["amount_micros"] for e in seen["ledger"]) == seen["balance_micros"]
        return dict(seen)


@pytest.fixture
def site(tmp_path: Path, fake_openai: FakeOpenAI) -> Iterator[Site]:
    with serve_gateway(page_config(tmp_path, fake_openai.base_url)) as gateway:
        yield Site(gateway, fake_openai)


@pytest.fixture
def page(browser: Any, site: Site) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    opened = context.new_page()
    sync_api.expect.set_options(timeout=15_000)
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"pageerror: {error}"))
    opened.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" and (
        "Content Security Policy" in msg.text or "Trusted Type" in msg.text) else None)
    opened.problems = problems
    yield opened
    context.close()
