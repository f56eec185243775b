"""Async tasks: a request answered at once with a task id, run in the background of this replica.

The store is the truth (router/state/tasks.py): a task's row, its lease, and the one conditional
UPDATE that ends it and settles its hold. This module runs tasks, renews their leases, stops the
ones ended elsewhere (a cancel that reached another replica), and sweeps lapsed leases. The HTTP
views of tasks are the surfaces' (router/http/task_views.py).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ..artifacts import ArtifactStore
from ..config import Config
from ..errors import ApiError
from ..metrics import Metrics
from ..routing import Served, Trail
from ..state import Store, TaskRecord
from .caller import Caller
from .delivery import Delivery
from .drain import Drain
from .results import image_item, images_body
from .settlement import SETTLE_TIMEOUT_S, STALE_HOLD_GRACE_S, Admitted
from .validation import Prepared

log = logging.getLogger("imagegate.tasks")
ARTIFACT_SWEEP_S = 300.0  # expired artifacts go within five minutes of expiry (and at each start)
PROGRESS_EVERY_S = 0.5  # progress is written at most this often: previews can fire per step
SHUTDOWN = {"message": "the gateway shut down before the task finished; its credit hold was released",
            "type": "server_error", "param": None, "code": "shutting_down"}
# How a task ended: status, result, error, micro-dollars to capture.
Outcome = tuple[str, dict[str, Any] | None, dict[str, Any] | None, int]


class TaskRunner:
    """This replica's tasks: running, lease-renewed, and stopped when ended elsewhere."""

    def __init__(self, cfg: Config, store: Store, artifacts: ArtifactStore, delivery: Delivery, drain: Drain,
                 metrics: Metrics) -> None:
        self.cfg, self.store, self.artifacts, self.delivery = cfg, store, artifacts, delivery
        self.drain, self.metrics = drain, metrics
        self.lease_s = cfg.state.lease_s
        self.replica = "rep_" + secrets.token_hex(8)  # a new owner name per process start
        self.running: dict[str, asyncio.Task[None]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._next_artifact_sweep = 0.0

    async def start(self) -> None:
        await self.sweep()  # leases that lapsed while no replica was up
        self._loops = [asyncio.create_task(self._every(self.lease_s / 3, self._renew)),
                       asyncio.create_task(self._every(self.lease_s / 2, self.sweep))]

    async def stop(self) -> None:
        """Cancel what still runs: each task fails and refunds itself. After SIGTERM the running tasks
        first get the drain's grace period (their deadlines were cut to it) to finish."""
        if self.drain.draining and self.running:
            with anyio.move_on_after(self.cfg.server.shutdown_grace_s):
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
        running = set(self.running)  # before the round trip: a task submitted meanwhile is not judged
        alive = await self.store.renew_leases(self.replica, running, self.lease_s)
        for task_id in running - alive:  # cancelled through another replica, or swept
            if (task := self.running.get(task_id)) is not None:
                task.cancel()

    async def sweep(self) -> None:
        failed = await self.store.fail_abandoned_tasks()
        for task_id in failed:
            log.warning("task %s abandoned by its replica: failed, hold released", task_id)
            self.metrics.tasks.labels("failed").inc()
        # Holds whose settle failed (the store was briefly away) must not wait for the next start.
        await self.store.release_stale_holds(self.cfg.longest_run_s + STALE_HOLD_GRACE_S)
        await self.store.delete_expired_tasks()
        await self.store.delete_expired_idempotency()
        if time.monotonic() >= self._next_artifact_sweep:  # a bucket listing: not every few seconds
            self._next_artifact_sweep = time.monotonic() + ARTIFACT_SWEEP_S
            await self.artifacts.sweep()

    async def submit(self, prepared: Prepared, caller: Caller, admitted: Admitted,
                     webhook: tuple[str, str] | None = None) -> TaskRecord:
        """Write the task (queued, leased to us) and start it; it now owns the hold and the slot: its
        end settles them, in the same transaction."""
        hold = admitted.hold
        record = await self.store.create_task(
            task_id="task_" + secrets.token_hex(12), key_id=caller.owner, model=prepared.model_id,
            operation=prepared.request.operation, response_format=prepared.response_format,
            hold_id=hold.id if hold else None, slot_id=admitted.slot,
            billing={**prepared.price.body(), "held_micros": hold.micros if hold else 0, "charged_micros": 0},
            ttl_s=max(self.artifacts.ttl_s, prepared.keep_s or 0), owner=self.replica, lease_s=self.lease_s,
            webhook=webhook)
        self.metrics.tasks.labels("submitted").inc()
        task = self.running[record.id] = asyncio.create_task(self._run(record, prepared))
        # Not in `_run`'s finally: a task cancelled before its first step never runs that.
        task.add_done_callback(lambda _: self.running.pop(record.id, None))
        return record

    async def _run(self, record: TaskRecord, prepared: Prepared) -> None:
        outcome: Outcome = ("failed", None, SHUTDOWN, 0)
        try:
            if await self.store.start_task(record.id, self.replica):
                outcome = await self._work(record, prepared)
            else:
                outcome = ("canceled", None, None, 0)  # ended before it began; nothing to write
        except ApiError as exc:
            outcome = ("failed", None, exc.payload(), 0)
        except Exception:
            log.exception("task %s failed", record.id)
            outcome = ("failed", None, ApiError(500, "internal error", code="internal_error").payload(), 0)
        finally:
            if outcome[0] != "canceled":  # bounded: past it, the lease lapses and a sweep ends the task
                with anyio.CancelScope(shield=True), anyio.move_on_after(SETTLE_TIMEOUT_S):
                    await self._finish(record, outcome)

    async def _finish(self, record: TaskRecord, outcome: Outcome) -> None:
        status, result, error, captured = outcome
        charged = captured if status == "succeeded" and record.hold_id is not None else 0  # no hold: unmetered
        billing = {**record.billing, "charged_micros": charged}
        try:
            ended = await self.store.finish_task(record.id, status, result=result, error=error,
                                                 captured_micros=captured, owner=self.replica, billing=billing)
        except Exception:  # the lease lapses and another sweep fails it and refunds the hold
            log.exception("could not record the end of task %s", record.id)
            return
        if ended:
            self.metrics.tasks.labels(status).inc()

    async def _work(self, record: TaskRecord, prepared: Prepared) -> Outcome:
        done = [0.0]
        prepared.request.on_progress = lambda step, total: done.__setitem__(0, step / total if total else 0.0)
        # A plain task, not a task group: the group would wrap our ApiErrors in an ExceptionGroup.
        reporter = asyncio.create_task(self._report_progress(record.id, done))
        try:
            inputs = await self.delivery.keep_inputs(prepared.inputs, record.key_id)
            served = await self._route_when_free(prepared)
            delivered = await self.delivery.deliver(prepared, served)
        finally:
            reporter.cancel()
        await self.delivery.store(delivered.images, record.key_id, prepared.keep_s)
        items = [image_item(image, artifact_id=image.artifact.id) for image in delivered.images if image.artifact]
        result = images_body(items, delivered, prepared, delivered.price.body(), inputs)
        return "succeeded", result, None, delivered.price.cost_micros

    async def _route_when_free(self, prepared: Prepared) -> Served:
        """Route the task; while every route is at capacity (429 queue_full), wait for room instead
        of failing: a task's client is not there to retry. The whole of it stays within the task
        deadline (`tasks.timeout_s`), which the stale-hold sweep counts on."""
        give_up = anyio.current_time() + self.cfg.task_timeout_s
        while True:
            try:
                return await self.delivery.route(prepared, Trail(), timeout_s=give_up - anyio.current_time())
            except ApiError as exc:
                wait_s = float(exc.headers.get("retry-after", "1"))
                if exc.code != "queue_full" or anyio.current_time() + wait_s >= give_up:
                    raise
                await anyio.sleep(wait_s)

    async def _report_progress(self, task_id: str, done: list[float]) -> None:
        written = 0.0
        while True:
            await anyio.sleep(PROGRESS_EVERY_S)
            if done[0] > written:
                try:
                    await self.store.task_progress(task_id, done[0])
                    written = done[0]
                except Exception:  # progress is advisory: the task goes on
                    log.warning("could not record the progress of task %s", task_id)

    # -- what the surfaces ask of tasks

    async def owned(self, task_id: str, caller: Caller) -> TaskRecord:
        """The caller's task, or 404 for anything else: unknown, expired, or another key's."""
        task = await self.store.get_task(task_id)
        if task is None or task.key_id != caller.owner or task.expires_at <= time.time():
            raise ApiError(404, f"task '{task_id}' not found", code="task_not_found")
        return task

    async def cancel(self, task_id: str, caller: Caller) -> TaskRecord:
        """Cancel the caller's queued or running task (its hold is released); 409 once it ended."""
        task = await self.owned(task_id, caller)
        if task.active and await self.store.finish_task(task.id, "canceled"):
            self.metrics.tasks.labels("canceled").inc()
            if (running := self.running.get(task.id)) is not None:
                running.cancel()  # on another replica, its next lease renewal notices instead
            return await self.owned(task_id, caller)
        task = await self.owned(task_id, caller)
        raise ApiError(409, f"task '{task.id}' is already {task.status}", code="task_not_cancelable")

    async def images_of(self, task: TaskRecord) -> dict[str, bytes]:
        """The bytes of a succeeded task's images when it answers base64 (url answers need none)."""
        if task.result is None or task.response_format == "url":
            return {}
        out = {}
        for item in task.result["data"]:
            found = await self.artifacts.get(item["artifact_id"])
            if found is None:
                raise ApiError(404, f"task '{task.id}' has expired", code="task_not_found")
            out[item["artifact_id"]] = found[1]
        return out
