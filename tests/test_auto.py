"""`model: "auto"`: only candidates that can serve this request now, ordered by the configured policy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY, Gateway, base_config
from tests.fakes.openai_upstream import FakeOpenAI

StartGateway = Callable[[dict[str, Any]], Gateway]


@pytest.fixture
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    fast, slow = FakeOpenAI(UPSTREAM_KEY).start(), FakeOpenAI(UPSTREAM_KEY).start()
    yield fast, slow
    fast.stop()
    slow.stop()


def auto_config(tmp_path: Path, one: FakeOpenAI, two: FakeOpenAI, policy: str, **two_model: Any) -> dict[str, Any]:
    """Candidates `one` (priced higher) and `two`, each on its own provider; `two` listed second."""
    cfg = base_config(tmp_path)
    for name, fake in (("p1", one), ("p2", two)):
        cfg["providers"][name] = {"type": "openai", "base_url": fake.base_url, "api_key": UPSTREAM_KEY,
                                  "circuit": {"failures": 1, "cooldown_s": 60}}
    cfg["models"]["one"] = {"price_per_mp": 0.05, "routes": [{"provider": "p1", "model": "m1"}]}
    cfg["models"]["two"] = {"price_per_mp": 0.01, "routes": [{"provider": "p2", "model": "m2"}], **two_model}
    cfg["auto"] = {"policy": policy, "candidates": ["one", "two"]}
    return cfg


def auto(gw: Gateway, **body: Any) -> httpx.Response:
    return gw.http.post("/v1/images/generations", json={"model": "auto", "prompt": "p", "size": "256x256", **body})


def test_priority_takes_the_first_candidate_that_fits(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                                      start_gateway: StartGateway) -> None:
    gw = start_gateway(auto_config(tmp_path, *fakes, "priority"))
    resp = auto(gw)
    assert resp.headers["x-imagegate-model"] == "one" and resp.json()["model"] == "one"
    assert resp.headers["x-imagegate-provider"] == "p1"


def test_cheapest_prices_this_very_request(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                           start_gateway: StartGateway) -> None:
    gw = start_gateway(auto_config(tmp_path, *fakes, "cheapest"))
    assert auto(gw).headers["x-imagegate-model"] == "two"


def test_candidates_that_cannot_take_the_request_are_left_out(
        tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI], start_gateway: StartGateway) -> None:
    # `two` is cheaper but only makes 1024x1024 and one image at a time.
    gw = start_gateway(auto_config(tmp_path, *fakes, "cheapest", sizes=["1024x1024"], limits={"max_n": 1}))
    assert auto(gw).headers["x-imagegate-model"] == "one"  # 256x256 is not a size of `two`
    assert auto(gw, size="1024x1024", n=2).headers["x-imagegate-model"] == "one"  # n=2 is over its max_n
    assert auto(gw, size="1024x1024").headers["x-imagegate-model"] == "two"
    resp = auto(gw, size="100x100")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "no_candidate_model"


def test_an_open_circuit_takes_a_candidate_out(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                               start_gateway: StartGateway) -> None:
    one, two = fakes
    gw = start_gateway(auto_config(tmp_path, one, two, "cheapest"))
    two.behave(fail_status=500)
    assert auto(gw).status_code == 502  # `two` was chosen and failed: its circuit opens (failures: 1)
    calls = len(two.requests)
    resp = auto(gw)
    assert resp.status_code == 200 and resp.headers["x-imagegate-model"] == "one"
    assert len(two.requests) == calls


def test_fastest_follows_observed_latency(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                          start_gateway: StartGateway) -> None:
    one, two = fakes
    one.behave(delay_s=0.4)
    gw = start_gateway(auto_config(tmp_path, one, two, "fastest"))
    # Nothing measured yet: candidates are tried in order, each gets measured once.
    assert auto(gw).headers["x-imagegate-model"] == "one"
    assert auto(gw).headers["x-imagegate-model"] == "two"  # `one` is measured (slow), `two` is not yet
    assert [auto(gw).headers["x-imagegate-model"] for _ in range(3)] == ["two"] * 3
    # `two` slows down past `one`: the moving average follows within a few requests.
    one.behave()
    two.behave(delay_s=0.6)
    served = [auto(gw).headers["x-imagegate-model"] for _ in range(8)]
    assert served[-1] == "one"


def test_least_busy_avoids_the_provider_with_work_in_flight(
        tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI], start_gateway: StartGateway) -> None:
    one, two = fakes
    one.behave(delay_s=3.0)
    gw = start_gateway(auto_config(tmp_path, one, two, "least_busy"))
    p1 = gw.state.router.health["p1"].limiter

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            body = {"model": "auto", "prompt": "p", "size": "256x256"}
            busy = asyncio.create_task(client.post("/v1/images/generations", json=body))
            deadline = time.monotonic() + 10
            while not (p1.in_flight == 1 and one.requests):  # `one` (first in order) now has a call in flight
                assert time.monotonic() < deadline, "the first request never reached `one`"
                await asyncio.sleep(0.01)
            started = time.monotonic()
            second = await client.post("/v1/images/generations", json=body)
            assert not busy.done()  # did not wait behind the busy one
            assert time.monotonic() - started < 2.5
            return await busy, second

    first, second = asyncio.run(scenario())
    assert first.headers["x-imagegate-model"] == "one"
    assert second.headers["x-imagegate-model"] == "two"
