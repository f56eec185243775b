"""Async tasks: `"async": true` (or `Prefer: respond-async`) → 202 and a task that runs in the
background of this replica; GET /v1/tasks/{id}; POST /v1/tasks/{id}/cancel.

The store is the truth (router/state/tasks.py): a task's row, its lease, and the one conditional
UPDATE that ends it and settles its hold. This module runs tasks, renews their leases, stops the
ones ended elsewhere (a cancel that reached another replica), and sweeps lapsed leases.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
import pybase64
from starlette.requests import Request
from starlette.responses import Response

from .admission import Admitted
from .attempts import Trail
from .auth import owner_id
from .billing import SETTLE_TIMEOUT_S
from .delivery import deliver, route
from .errors import ApiError
from .gateway import STALE_HOLD_GRACE_S, Gateway, JSONResponse
from .output import MICRO, Price, images_response
from .routing import Served
from .state import TaskRecord
from .validation import Prepared

log = logging.getLogger("imagegate.tasks")
PROGRESS_EVERY_S = 0.5  # progress is written at most this often: previews can fire per step
SHUTDOWN = {"message": "the gateway shut down before the task finished; its credit hold was released",
            "type": "server_error", "param": None, "code": "shutting_down"}


class TaskRunner:
    """This replica's tasks: running, lease-renewed, and stopped when ended elsewhere."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.replica = "rep_" + secrets.token_hex(8)  # a new owner name per process start
        self.running: dict[str, asyncio.Task[None]] = {}
        self._loops: list[asyncio.Task[None]] = []

    @property
    def lease_s(self) -> float:
        return self.gw.cfg.state.lease_s

    async def start(self) -> None:
        await self.sweep()
        self._loops = [asyncio.create_task(self._every(self.lease_s / 3, self._renew)),
                       asyncio.create_task(self._every(self.lease_s / 2, self.sweep))]

    async def stop(self) -> None:
        """Cancel what still runs: each task fails and refunds itself. After SIGTERM the running tasks
        first get the drain's grace period (their deadlines were cut to it) to finish."""
        if self.gw.draining and self.running:
            with anyio.move_on_after(self.gw.cfg.server.shutdown_grace_s):
                await asyncio.wait(list(self.running.values()))
        for task in [*self._loops, *self.running.values()]:
            task.cancel()
        await asyncio.gather(*self._loops, *self.running.values(), return_exceptions=True)

    async def _every(self, period_s: float, job: Callable[[], Awaitable[Any]]) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await job()
            except Exception:  # the store was unreachable for a moment: try again next period
                log.exception("task housekeeping failed")

    async def _renew(self) -> None:
        assert self.gw.store is not None
        running = set(self.running)  # before the round trip: a task submitted meanwhile is not judged
        alive = await self.gw.store.renew_leases(self.replica, running, self.lease_s)
        for task_id in running - alive:  # cancelled through another replica, or swept
            if (task := self.running.get(task_id)) is not None:
                task.cancel()

    async def sweep(self) -> None:
        assert self.gw.store is not None
        failed = await self.gw.store.fail_abandoned_tasks()
        for task_id in failed:
            log.warning("task %s abandoned by its replica: failed, hold released", task_id)
            self.gw.metrics.tasks.labels("failed").inc()
        # Holds whose settle failed (the store was briefly away) must not wait for the next start.
        await self.gw.store.release_stale_holds(self.gw.cfg.server.request_timeout_s + STALE_HOLD_GRACE_S)
        await self.gw.store.delete_expired_tasks()
        await self.gw.store.delete_expired_idempotency()
        await anyio.to_thread.run_sync(self.gw.artifacts.sweep)  # file reads: off the event loop

    async def submit(self, request: Request, prepared: Prepared, operation: str, admitted: Admitted) -> TaskRecord:
        """Write the task (queued, leased to us) and start it; the caller answers 202."""
        gw = self.gw
        assert gw.store is not None
        req = prepared.request
        price = Price.of(req.width, req.height, req.n, gw.router.model(prepared.model_id).price_per_mp)
        held = admitted.hold.micros if admitted.hold else 0
        record = await gw.store.create_task(
            task_id="task_" + secrets.token_hex(12), key_id=owner_id(request), model=prepared.model_id,
            operation=operation, response_format=prepared.response_format,
            hold_id=admitted.hold.id if admitted.hold else None, slot_id=admitted.slot,
            billing={**price.body(), "held_micros": held, "charged_micros": 0},
            ttl_s=gw.artifacts.ttl_s, owner=self.replica, lease_s=self.lease_s)
        gw.metrics.tasks.labels("submitted").inc()
        task = self.running[record.id] = asyncio.create_task(self._run(record, prepared))
        # Not in `_run`'s finally: a task cancelled before its first step never runs that.
        task.add_done_callback(lambda _: self.running.pop(record.id, None))
        return record

    async def _run(self, record: TaskRecord, prepared: Prepared) -> None:
        store = self.gw.store
        assert store is not None
        outcome: tuple[str, dict[str, Any] | None, dict[str, Any] | None, int] = ("failed", None, SHUTDOWN, 0)
        try:
            if await store.start_task(record.id, self.replica):
                outcome = await self._work(record, prepared)
            else:
                outcome = ("canceled", None, None, 0)  # ended before it began; nothing to write
        except ApiError as exc:
            outcome = ("failed", None, exc.payload(), 0)
        except Exception:
            log.exception("task %s failed", record.id)
            outcome = ("failed", None, ApiError(500, "internal error", code="internal_error").payload(), 0)
        finally:
            status, result, error, captured = outcome
            if status != "canceled":  # bounded: past it, the lease lapses and a sweep ends the task
                with anyio.CancelScope(shield=True), anyio.move_on_after(SETTLE_TIMEOUT_S):
                    await self._finish(record, status, result, error, captured)

    async def _finish(self, record: TaskRecord, status: str, result: dict[str, Any] | None,
                      error: dict[str, Any] | None, captured: int) -> None:
        assert self.gw.store is not None
        charged = captured if status == "succeeded" and record.hold_id is not None else 0  # no hold: unmetered
        billing = {**record.billing, "charged_micros": charged}
        try:
            ended = await self.gw.store.finish_task(record.id, status, result=result, error=error,
                                                    captured_micros=captured, owner=self.replica, billing=billing)
        except Exception:  # the lease lapses and another sweep fails it and refunds the hold
            log.exception("could not record the end of task %s", record.id)
            return
        if ended:
            self.gw.metrics.tasks.labels(status).inc()

    async def _work(self, record: TaskRecord, prepared: Prepared) -> tuple[str, dict[str, Any], None, int]:
        gw = self.gw
        done = [0.0]
        prepared.request.on_progress = lambda step, total: done.__setitem__(0, step / total if total else 0.0)
        # A plain task, not a task group: the group would wrap our ApiErrors in an ExceptionGroup.
        reporter = asyncio.create_task(self._report_progress(record.id, done))
        try:
            served = await self._route_when_free(prepared)
            finished, images, price = await deliver(gw, prepared, served)
        finally:
            reporter.cancel()
        items = []
        for one, image in zip(finished, images):
            art = await gw.artifacts.put(one.data, content_type=f"image/{one.info.format}", width=one.info.width,
                                         height=one.info.height, owner=record.key_id)
            item: dict[str, Any] = {"artifact_id": art.id, "seed": image.seed}
            if image.revised_prompt:
                item["revised_prompt"] = image.revised_prompt
            items.append(item)
        result = images_response(items, finished, prepared.request, prepared.model_id, price)
        return "succeeded", result, None, price.cost_micros

    async def _route_when_free(self, prepared: Prepared) -> Served:
        """Route the task; while every route is at capacity (429 queue_full), wait for room instead
        of failing: a task's client is not there to retry. The whole of it stays within one request
        deadline, which the stale-hold sweep counts on."""
        give_up = anyio.current_time() + self.gw.cfg.server.request_timeout_s
        while True:
            try:
                return await route(self.gw, prepared, Trail(), timeout_s=give_up - anyio.current_time())
            except ApiError as exc:
                wait_s = float(exc.headers.get("retry-after", "1"))
                if exc.code != "queue_full" or anyio.current_time() + wait_s >= give_up:
                    raise
                await anyio.sleep(wait_s)

    async def _report_progress(self, task_id: str, done: list[float]) -> None:
        assert self.gw.store is not None
        written = 0.0
        while True:
            await anyio.sleep(PROGRESS_EVERY_S)
            if done[0] > written:
                try:
                    await self.gw.store.task_progress(task_id, done[0])
                    written = done[0]
                except Exception:  # progress is advisory: the task goes on
                    log.warning("could not record the progress of task %s", task_id)





# -- HTTP ---------------------------------------------------------------------------------------

def accepted(gw: Gateway, request: Request, record: TaskRecord) -> Response:
    return JSONResponse(task_object(gw, request, record, None), status_code=202,
                        headers={"location": f"/v1/tasks/{record.id}", "x-imagegate-task": record.id,
                                 "x-imagegate-model": record.model})


def task_object(gw: Gateway, request: Request, task: TaskRecord,
                images: dict[str, bytes] | None) -> dict[str, Any]:
    held, charged = task.billing.get("held_micros", 0), task.billing.get("charged_micros", 0)
    refunded = held - charged if task.status in ("failed", "canceled", "succeeded") else 0
    billing = {k: v for k, v in task.billing.items() if not k.endswith("_micros")}
    billing.update(held=held / float(MICRO), charged=charged / float(MICRO), refunded=refunded / float(MICRO))
    return {"id": task.id, "object": "image.task", "status": task.status, "progress": task.progress,
            "created_at": int(task.created_at), "started_at": _int(task.started_at),
            "finished_at": _int(task.finished_at), "expires_at": int(task.expires_at), "model": task.model,
            "operation": task.operation, "result": _result(gw, request, task, images or {}),
            "error": task.error, "billing": billing}


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _result(gw: Gateway, request: Request, task: TaskRecord, images: dict[str, bytes]) -> dict[str, Any] | None:
    if task.result is None:
        return None
    base = gw.base_url(request)
    data = []
    for item in task.result["data"]:
        out = dict(item)
        if task.response_format == "url":
            out["url"] = base + gw.artifacts.signed_path_for(item["artifact_id"], int(task.expires_at))
        else:
            out["b64_json"] = pybase64.b64encode(images.get(item["artifact_id"], b"")).decode("ascii")
        data.append(out)
    return {**task.result, "data": data}


async def _owned(request: Request, gw: Gateway) -> TaskRecord:
    """The caller's task, or 404 for anything else: unknown, expired, or another key's."""
    task_id = request.path_params["task_id"]
    task = await gw.store.get_task(task_id) if gw.store is not None else None
    if task is None or task.key_id != owner_id(request) or task.expires_at <= time.time():
        raise ApiError(404, f"task '{task_id}' not found", code="task_not_found")
    return task


async def _images_of(gw: Gateway, task: TaskRecord) -> dict[str, bytes]:
    if task.result is None or task.response_format == "url":
        return {}
    out = {}
    for item in task.result["data"]:
        found = await gw.artifacts.get(item["artifact_id"])
        if found is None:
            raise ApiError(404, f"task '{task.id}' has expired", code="task_not_found")
        out[item["artifact_id"]] = found[1]
    return out


async def get_task(request: Request) -> Response:
    request.state.endpoint = "/v1/tasks/{id}"
    gw: Gateway = request.app.state.gateway
    task = await _owned(request, gw)
    return JSONResponse(task_object(gw, request, task, await _images_of(gw, task)))


async def cancel_task(request: Request) -> Response:
    request.state.endpoint = "/v1/tasks/{id}/cancel"
    gw: Gateway = request.app.state.gateway
    task = await _owned(request, gw)
    assert gw.store is not None
    if task.active and await gw.store.finish_task(task.id, "canceled"):
        gw.metrics.tasks.labels("canceled").inc()
        if (running := gw.tasks.running.get(task.id)) is not None:
            running.cancel()  # on another replica, its next lease renewal notices instead
        task = await _owned(request, gw)
        return JSONResponse(task_object(gw, request, task, None))
    task = await _owned(request, gw)
    raise ApiError(409, f"task '{task.id}' is already {task.status}", code="task_not_cancelable")
