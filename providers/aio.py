"""Concurrency helpers the adapters share: fan-out of one call per image, and polling a task."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from .base import UpstreamError

T = TypeVar("T")


async def gather(calls: list[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the calls at once; results in order. The first failure cancels the rest.

    A task group wraps failures in an ExceptionGroup; the router expects the UpstreamError itself,
    and when several failed, the one that must not be retried elsewhere (moderation, a bad request)
    is the one that tells the client the truth.
    """
    results: list[T | None] = [None] * len(calls)

    async def run(i: int, call: Callable[[], Awaitable[T]]) -> None:
        results[i] = await call()

    if len(calls) == 1:
        return [await calls[0]()]
    try:
        async with anyio.create_task_group() as tg:
            for i, call in enumerate(calls):
                tg.start_soon(run, i, call)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        errors = [e for e in leaves if isinstance(e, UpstreamError)]
        if errors:
            raise min(errors, key=lambda e: e.fallback) from None
        raise leaves[0] from None  # as a single call would raise it: never a group the router cannot read
    return [r for r in results if r is not None]


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def poll(check: Callable[[], Awaitable[T | None]], *, interval_s: float, max_interval_s: float,
               factor: float = 1.5) -> T:
    """Call `check` until it returns a result, backing off from `interval_s` up to `max_interval_s`.

    There is no deadline here: the caller's `anyio.fail_after` (the provider's timeout) bounds it,
    and its cancellation is what lets an adapter cancel the task upstream.
    """
    while True:
        result = await check()
        if result is not None:
            return result
        await anyio.sleep(interval_s)
        interval_s = min(max_interval_s, interval_s * factor)
