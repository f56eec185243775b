"""Helpers every HTTP adapter leans on, fed what upstreams really send, odd cases included."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import anyio
import httpx
import pytest

from imagegate.providers.aio import gather
from imagegate.providers.base import UpstreamError
from imagegate.providers.http import MAX_RETRY_AFTER_S, retry_after_seconds, transport_error
from imagegate.router.errors import ApiError


def _after(value: str) -> float | None:
    return retry_after_seconds(httpx.Response(429, headers={"retry-after": value}))


def test_retry_after_reads_seconds_and_http_dates_and_never_raises() -> None:
    assert _after("7") == 7.0 and _after("0.5") == 0.5 and _after("-3") == 0.0
    soon = datetime.now(UTC) + timedelta(seconds=30)
    assert 25 <= (_after(format_datetime(soon, usegmt=True)) or 0) <= 30
    # "-0000" parses to a naive datetime: read as GMT, not a TypeError.
    assert 25 <= (_after(soon.strftime("%a, %d %b %Y %H:%M:%S -0000")) or 0) <= 30
    assert _after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now
    assert _after("inf") == MAX_RETRY_AFTER_S and _after("1e12") == MAX_RETRY_AFTER_S
    for junk in ("nan", "soon", "Wed, 99 Foo", ""):
        assert _after(junk) is None
    assert ApiError(429, "x", retry_after=float("inf")).headers["retry-after"] == "86400"
    assert "retry-after" not in ApiError(429, "x", retry_after=float("nan")).headers


def test_lost_answer_is_a_retryable_timeout_and_a_failed_send_is_unavailable() -> None:
    lost = transport_error(httpx.ReadError("reset"))
    assert (lost.code, lost.status, lost.retryable) == ("upstream_timeout", 504, True)
    unsent = transport_error(httpx.WriteError("broken pipe"))
    assert (unsent.code, unsent.retryable) == ("upstream_unavailable", True)
    refused = transport_error(httpx.ConnectError("refused"))
    assert refused.code == "upstream_unavailable"


def test_fan_out_raises_a_failure_itself_never_a_group() -> None:
    async def ok() -> int:
        return 1

    async def broken() -> int:
        raise KeyError("missing field")

    async def moderated() -> int:
        raise UpstreamError("no", status=400, code="content_policy_violation")

    async def unavailable() -> int:
        raise UpstreamError("down", status=502, code="upstream_error", retryable=True, fallback=True)

    async def main() -> None:
        assert await gather([ok, ok, ok]) == [1, 1, 1]
        with pytest.raises(KeyError):
            await gather([ok, broken])
        with pytest.raises(UpstreamError) as info:  # an upstream's failure is preferred over a bug's
            await gather([broken, unavailable])
        assert info.value.code == "upstream_error"
        # Calls that fail before their first await all fail in one group: the one that must not be
        # retried elsewhere is what the client hears.
        with pytest.raises(UpstreamError) as info:
            await gather([unavailable, moderated, ok])
        assert info.value.code == "content_policy_violation"

    anyio.run(main)
