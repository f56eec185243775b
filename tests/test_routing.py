"""Routing under faults: retries, fallbacks, circuit breakers, queues and deadlines.

Two fake OpenAI upstreams (real HTTP servers on 127.0.0.1) are providers `a` and `b`; model `chain`
routes to `a` first, then `b`. Each test tells the fakes how to misbehave and watches what the
client sees, what each upstream received, and what the gateway reports in /metrics and /readyz.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY, Gateway, base_config, decode
from tests.fakes.openai_upstream import FakeOpenAI

StartGateway = Callable[[dict[str, Any]], Gateway]
ADMIN_KEY = "admin-secret-for-tests"


@pytest.fixture
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    a, b = FakeOpenAI(UPSTREAM_KEY).start(), FakeOpenAI(UPSTREAM_KEY).start()
    yield a, b
    a.stop()
    b.stop()


def chain_config(tmp_path: Path, a: FakeOpenAI, b: FakeOpenAI, *, retry: dict[str, Any] | None = None,
                 a_opts: dict[str, Any] | None = None, b_opts: dict[str, Any] | None = None,
                 timeout_s: float = 20) -> dict[str, Any]:
    cfg = base_config(tmp_path)
    cfg["server"]["request_timeout_s"] = timeout_s
    cfg["auth"] = {"admin_key": ADMIN_KEY}
    for name, fake, opts in (("a", a, a_opts), ("b", b, b_opts)):
        cfg["providers"][name] = {"type": "openai", "base_url": fake.base_url, "api_key": UPSTREAM_KEY,
                                  "circuit": {"failures": 3, "cooldown_s": 30}, **(opts or {})}
    retry = {"attempts": 2, "backoff_s": 0.01, "max_backoff_s": 0.05, **(retry or {})}
    cfg["models"]["chain"] = {"price_per_mp": 0.01, "limits": {"max_n": 4},
                              "routes": [{"provider": "a", "model": "model-a", "retry": retry},
                                         {"provider": "b", "model": "model-b"}]}
    cfg["models"]["only-a"] = {"routes": [{"provider": "a", "model": "model-a", "retry": {"attempts": 1}}]}
    return cfg


def generate(gw: Gateway, model: str = "chain", **kwargs: Any) -> httpx.Response:
    return gw.http.post("/v1/images/generations", json={"model": model, "prompt": "p", "size": "256x256", **kwargs})


def metric(gw: Gateway, name: str, **labels: str) -> float:
    """One sample's value from the gateway's /metrics (0 when absent)."""
    text = gw.http.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Poll `check` until it holds: a synchronisation point instead of a guessed sleep."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


async def await_until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# -- retries and fallbacks -------------------------------------------------------------------------

def test_first_route_503_is_retried_then_served_by_the_second(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                                               start_gateway: StartGateway) -> None:
    a, b = fakes
    a.behave(fail_status=503)
    gw = start_gateway(chain_config(tmp_path, a, b))
    resp = gw.client.images.with_raw_response.generate(model="chain", prompt="p", size="256x256")
    assert resp.headers["x-imagegate-provider"] == "b"
    assert decode(resp.parse().data[0].b64_json).size == (256, 256)
    assert len(a.requests) == 2 and len(b.requests) == 1  # attempts: 2 on a, then b
    assert b.last.json is not None and b.last.json["model"] == "model-b"
    assert metric(gw, "imagegate_upstream_attempts_total", provider="a", outcome="5xx") == 2
    assert metric(gw, "imagegate_upstream_retries_total", provider="a") == 1
    assert metric(gw, "imagegate_fallbacks_total", model="chain", from_provider="a", to_provider="b") == 1
    assert metric(gw, "imagegate_upstream_attempts_total", provider="b", outcome="ok") == 1


def test_a_retry_succeeds_on_the_same_route(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                            start_gateway: StartGateway) -> None:
    a, b = fakes
    a.behave(fail_status=500, fail_times=1)
    gw = start_gateway(chain_config(tmp_path, a, b))
    resp = generate(gw)
    assert resp.status_code == 200 and resp.headers["x-imagegate-provider"] == "a"
    assert len(a.requests) == 2 and not b.requests


@pytest.mark.parametrize(("status", "body", "code"), [
    (400, {"error": {"message": "bad size", "type": "invalid_request_error", "param": "size", "code": None}},
     "upstream_rejected"),
    (400, {"error": {"message": "rejected by the safety system", "type": "invalid_request_error",
                     "param": None, "code": "moderation_blocked"}}, "content_policy_violation"),
])
def test_request_errors_and_moderation_are_neither_retried_nor_fallen_back(
        tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI], start_gateway: StartGateway,
        status: int, body: dict[str, Any], code: str) -> None:
    a, b = fakes
    a.behave(fail_status=status, error_body=body)
    gw = start_gateway(chain_config(tmp_path, a, b, retry={"attempts": 3}))
    with pytest.raises(openai.BadRequestError) as info:
        gw.client.images.generate(model="chain", prompt="p", size="256x256")
    assert info.value.code == code
    assert len(a.requests) == 1 and not b.requests
    # An upstream that says "no" is alive: the circuit stays closed.
    assert gw.state.router.health["a"].breaker.state.name == "CLOSED"


def test_retry_after_is_honoured_between_attempts(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                                  start_gateway: StartGateway) -> None:
    a, b = fakes
    a.behave(fail_status=429, fail_times=1, retry_after="1")
    gw = start_gateway(chain_config(tmp_path, a, b))
    started = time.monotonic()
    resp = generate(gw)
    assert resp.status_code == 200 and resp.headers["x-imagegate-provider"] == "a"
    assert time.monotonic() - started >= 1.0  # waited for the upstream's Retry-After, not the 10 ms backoff
    assert metric(gw, "imagegate_upstream_attempts_total", provider="a", outcome="429") == 1


def test_a_retry_after_past_the_cap_falls_back_at_once(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                                       start_gateway: StartGateway) -> None:
    a, b = fakes
    a.behave(fail_status=429, retry_after="120")
    gw = start_gateway(chain_config(tmp_path, a, b, retry={"max_retry_after_s": 5}))
    started = time.monotonic()
    resp = generate(gw)
    assert resp.headers["x-imagegate-provider"] == "b"
    assert len(a.requests) == 1 and time.monotonic() - started < 5


def test_every_route_failing_answers_the_last_error_with_retry_after(
        tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI], start_gateway: StartGateway) -> None:
    a, b = fakes
    a.behave(fail_status=500)
    b.behave(fail_status=429, retry_after="7")
    gw = start_gateway(chain_config(tmp_path, a, b))
    resp = generate(gw)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "7"
    assert "x-should-retry" not in resp.headers  # nothing was paid for: the SDK may retry
    assert UPSTREAM_KEY not in resp.text


# -- deadlines and paid calls ----------------------------------------------------------------------

def test_a_hung_upstream_meets_the_request_deadline(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                                    start_gateway: StartGateway) -> None:
    a, b = fakes
    a.behave(delay_s=30)
    gw = start_gateway(chain_config(tmp_path, a, b, timeout_s=1))
    started = time.monotonic()
    resp = generate(gw)
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - started < 5
    assert resp.headers["x-should-retry"] == "false"  # the upstream was mid-call: it may have charged
    assert not b.requests


def test_a_paid_call_that_failed_says_do_not_retry(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                                   start_gateway: StartGateway) -> None:
    a, b = fakes
    a.behave(mode="not_image")  # the upstream ran and answered 200, with bytes that are no image
    gw = start_gateway(chain_config(tmp_path, a, b))
    with pytest.raises(openai.APIStatusError) as info:
        gw.client.images.generate(model="only-a", prompt="p", size="256x256")
    assert info.value.status_code == 502
    assert info.value.response.headers["x-should-retry"] == "false"


def test_a_connect_error_leaves_the_sdk_free_to_retry(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                                      start_gateway: StartGateway) -> None:
    a, b = fakes
    a.stop()  # nobody listens on a's port any more
    gw = start_gateway(chain_config(tmp_path, a, b))
    resp = generate(gw, model="only-a")
    assert resp.status_code == 503 and "x-should-retry" not in resp.headers


# -- circuit breaker -------------------------------------------------------------------------------

def test_failures_open_the_circuit_and_recovery_closes_it(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                                          start_gateway: StartGateway) -> None:
    a, b = fakes
    a.behave(fail_status=502)
    # The cool-down is long enough for every check below to run while the circuit is still open.
    gw = start_gateway(chain_config(tmp_path, a, b, a_opts={"circuit": {"failures": 2, "cooldown_s": 3}}))
    breaker = gw.state.router.health["a"].breaker
    for _ in range(2):
        assert generate(gw, model="only-a").status_code == 502
    calls = len(a.requests)
    started = time.monotonic()
    skipped = generate(gw, model="only-a")
    assert skipped.status_code == 503 and skipped.json()["error"]["code"] == "no_healthy_route"
    assert int(skipped.headers["retry-after"]) >= 1
    assert len(a.requests) == calls and time.monotonic() - started < 2  # skipped without a call (or a wait)
    assert generate(gw).headers["x-imagegate-provider"] == "b"  # chain falls through to b at once
    assert len(a.requests) == calls
    assert metric(gw, "imagegate_circuit_state", provider="a") == 2
    ready = gw.http.get("/readyz").json()
    assert ready["circuits"]["a"] == "open"
    health = gw.http.get("/admin/providers", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
    assert health["a"]["circuit"] == "open" and health["a"]["consecutive_failures"] == 2
    # After the cool-down one probe goes through; the upstream has recovered, so the circuit closes.
    assert breaker.state.name == "OPEN"  # all of the above ran inside the cool-down
    a.behave()
    wait_until(breaker.available, "the cool-down to end")
    assert generate(gw, model="only-a").status_code == 200
    assert gw.state.router.health["a"].breaker.state.name == "CLOSED"
    assert metric(gw, "imagegate_circuit_state", provider="a") == 0


def test_a_failed_probe_opens_the_circuit_again(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                                start_gateway: StartGateway) -> None:
    a, b = fakes
    a.behave(fail_status=502)
    gw = start_gateway(chain_config(tmp_path, a, b, a_opts={"circuit": {"failures": 1, "cooldown_s": 2}}))
    breaker = gw.state.router.health["a"].breaker
    assert generate(gw, model="only-a").status_code == 502
    wait_until(breaker.available, "the cool-down to end")
    assert generate(gw, model="only-a").status_code == 502  # the probe, which fails
    calls = len(a.requests)
    assert generate(gw, model="only-a").status_code == 503  # open again: no call
    assert len(a.requests) == calls


def test_admin_view_needs_the_admin_key(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                        start_gateway: StartGateway) -> None:
    gw = start_gateway(chain_config(tmp_path, *fakes))
    assert gw.http.get("/admin/providers").status_code == 401
    assert gw.http.get("/admin/providers", headers={"authorization": "Bearer wrong"}).status_code == 401
    data = gw.http.get("/admin/providers", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
    assert data["a"]["circuit"] == "closed" and data["a"]["max_queue"] == 64
    assert UPSTREAM_KEY not in str(data)


# -- concurrency limits and the queue --------------------------------------------------------------

def test_a_full_queue_answers_429_with_retry_after(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                                   start_gateway: StartGateway) -> None:
    a, b = fakes
    a.behave(delay_s=2.0)
    gw = start_gateway(chain_config(tmp_path, a, b, a_opts={"max_concurrency": 1, "max_queue": 1}))
    limiter = gw.state.router.health["a"].limiter

    async def burst() -> list[httpx.Response]:
        # One in flight, one in line (each waited for, not guessed), then the third finds the line full.
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            body = {"model": "only-a", "prompt": "p", "size": "256x256"}
            first = asyncio.create_task(client.post("/v1/images/generations", json=body))
            await await_until(lambda: limiter.in_flight == 1, "the first request to take the slot")
            second = asyncio.create_task(client.post("/v1/images/generations", json=body))
            await await_until(lambda: limiter.waiting == 1, "the second request to wait in line")
            third = await client.post("/v1/images/generations", json=body)
            assert not first.done()  # the third was refused while the first still held the slot
            return [await first, await second, third]

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 429], [r.text[:300] for r in responses]
    assert metric(gw, "imagegate_route_skips_total", provider="a", reason="queue_full") == 1


def test_a_full_queue_on_the_first_route_falls_back(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                                    start_gateway: StartGateway) -> None:
    a, b = fakes
    a.behave(delay_s=2.0)
    gw = start_gateway(chain_config(tmp_path, a, b, a_opts={"max_concurrency": 1, "max_queue": 0}))
    limiter = gw.state.router.health["a"].limiter

    async def pair() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            first = asyncio.create_task(client.post("/v1/images/generations",
                                                    json={"model": "chain", "prompt": "p", "size": "256x256"}))
            await await_until(lambda: limiter.in_flight == 1, "the first request to take a's only slot")
            second = await client.post("/v1/images/generations",
                                       json={"model": "chain", "prompt": "p", "size": "256x256"})
            assert not first.done()  # a was still busy when the second came
            return [await first, second]

    first, second = asyncio.run(pair())
    assert first.headers["x-imagegate-provider"] == "a"
    assert second.headers["x-imagegate-provider"] == "b"


def test_a_client_that_disconnects_leaves_the_queue(tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI],
                                                    start_gateway: StartGateway) -> None:
    a, b = fakes
    a.behave(delay_s=3.0)
    gw = start_gateway(chain_config(tmp_path, a, b, a_opts={"max_concurrency": 1, "max_queue": 4}))
    limiter = gw.state.router.health["a"].limiter

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            body = {"model": "only-a", "prompt": "p", "size": "256x256"}
            busy = asyncio.create_task(client.post("/v1/images/generations", json=body))
            await await_until(lambda: limiter.in_flight == 1, "the first request to take the only slot")
            waiter = asyncio.create_task(client.post("/v1/images/generations", json=body))
            await await_until(lambda: limiter.waiting == 1, "the second request to wait in line")
            waiter.cancel()  # the client gives up: its connection is dropped
            with pytest.raises(asyncio.CancelledError):
                await waiter
            await await_until(lambda: limiter.waiting == 0, "the abandoned request to leave the line")
            assert not busy.done()  # it left the line, it was not served
            return await busy

    assert asyncio.run(scenario()).status_code == 200
    assert len(a.requests) == 1  # the one that gave up never reached the upstream


def test_500_concurrent_requests_against_a_slow_upstream_are_all_answered(
        tmp_path: Path, fakes: tuple[FakeOpenAI, FakeOpenAI], start_gateway: StartGateway) -> None:
    a, b = fakes
    a.behave(delay_s=0.2)
    a.record = False
    gw = start_gateway(chain_config(tmp_path, a, b, a_opts={"max_concurrency": 4, "max_queue": 16}))
    limiter = gw.state.router.health["a"].limiter
    peak = {"waiting": 0, "in_flight": 0}

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():
            peak["waiting"] = max(peak["waiting"], limiter.waiting)
            peak["in_flight"] = max(peak["in_flight"], limiter.in_flight)
            await asyncio.sleep(0.005)

    async def flood() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
        async with httpx.AsyncClient(base_url=gw.url, timeout=60, limits=limits) as client:
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch(stop))
            body = {"model": "only-a", "prompt": "p", "size": "64x64"}
            out = await asyncio.gather(*[client.post("/v1/images/generations", json=body) for _ in range(500)])
            stop.set()
            await watcher
            return list(out)

    responses = asyncio.run(flood())
    assert len(responses) == 500
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code in (429, 503)]
    assert len(ok) + len(refused) == 500, {r.status_code for r in responses}
    assert ok and refused
    assert all(decode(r.json()["data"][0]["b64_json"]).size == (64, 64) for r in ok)
    assert all(re.fullmatch(r"\d+", r.headers["retry-after"]) for r in refused)
    assert peak["in_flight"] <= 4 and peak["waiting"] <= 16  # never more held than the limits allow
    assert limiter.in_flight == 0 and limiter.waiting == 0
