"""Async tasks in the store, claimed by a replica through a lease: plain functions over a
connection, in the caller's transaction.

A task row is written when the task is accepted (with its hold and concurrency slot already
taken), renewed by its replica while it runs, and ended by exactly one conditional UPDATE:
whoever flips it out of queued/running — the replica finishing it, a cancel, or a sweeper
that found the lease lapsed — also settles its hold and frees its slot, in the same transaction.
So a task's money moves once, whichever replica gets there first.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import holds, webhooks
from .limits import release_slot
from .records import ACTIVE, TaskRecord
from .schema import tasks

ABANDONED = {"message": "the gateway running this task stopped before it finished; its credit hold "
                        "was released", "type": "server_error", "param": None, "code": "task_abandoned"}


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _task(row: sa.Row[Any]) -> TaskRecord:
    def load(text: str | None) -> Any:
        return None if text is None else orjson.loads(text)

    return TaskRecord(id=row.id, key_id=row.key_id, status=row.status, progress=row.progress, model=row.model,
                      operation=row.operation, response_format=row.response_format, hold_id=row.hold_id,
                      slot_id=row.slot_id, billing=load(row.billing), result=load(row.result),
                      error=load(row.error), created_at=row.created_at, started_at=row.started_at,
                      finished_at=row.finished_at, expires_at=row.expires_at, lease_owner=row.lease_owner)


def create(conn: Connection, *, task_id: str, key_id: str | None, model: str, operation: str,
           response_format: str, hold_id: str | None, slot_id: str | None, billing: dict[str, Any],
           ttl_s: float, owner: str, lease_s: float, webhook: tuple[str, str] | None = None) -> TaskRecord:
    """`webhook`: (url, base_url) where the task's end is announced."""
    now = time.time()
    conn.execute(tasks.insert().values(
        id=task_id, key_id=key_id, status="queued", progress=0.0, model=model, operation=operation,
        response_format=response_format, hold_id=hold_id, slot_id=slot_id, billing=_json(billing),
        result=None, error=None, created_at=now, started_at=None, finished_at=None,
        expires_at=now + ttl_s, lease_owner=owner, lease_until=now + lease_s))
    if webhook is not None:
        webhooks.register(conn, task_id, *webhook)
    found = get(conn, task_id)
    assert found is not None
    return found


def get(conn: Connection, task_id: str) -> TaskRecord | None:
    row = conn.execute(sa.select(tasks).where(tasks.c.id == task_id)).first()
    return _task(row) if row is not None else None


def start(conn: Connection, task_id: str, owner: str) -> bool:
    """queued → running; False when it was cancelled (or taken) meanwhile."""
    done = conn.execute(tasks.update()
                        .where(tasks.c.id == task_id, tasks.c.status == "queued", tasks.c.lease_owner == owner)
                        .values(status="running", started_at=time.time()))
    return done.rowcount == 1


def progress(conn: Connection, task_id: str, done: float) -> None:
    conn.execute(tasks.update().where(tasks.c.id == task_id, tasks.c.status == "running")
                 .values(progress=max(0.0, min(1.0, done))))


def finish(conn: Connection, task_id: str, status: str, *, result: dict[str, Any] | None = None,
           error: dict[str, Any] | None = None, captured_micros: int = 0, owner: str | None = None,
           lapsed_before: float | None = None, billing: dict[str, Any] | None = None) -> bool:
    """End an active task: its status, result or error, hold settled and slot freed, at once.

    `owner`: only if this replica still holds it. `lapsed_before`: only if its lease lapsed before
    then (the sweeper). False when someone else ended it first; then nothing moved here.
    """
    conditions = [tasks.c.id == task_id, tasks.c.status.in_(ACTIVE)]
    if owner is not None:
        conditions.append(tasks.c.lease_owner == owner)
    if lapsed_before is not None:
        conditions.append(tasks.c.lease_until < lapsed_before)
    values: dict[str, Any] = {"status": status, "finished_at": time.time(), "result": _json(result),
                              "error": _json(error), "lease_until": None}
    if status == "succeeded":
        values["progress"] = 1.0
    if billing is not None:
        values["billing"] = _json(billing)
    flipped = conn.execute(tasks.update().where(*conditions).values(**values))
    if flipped.rowcount != 1:
        return False
    row = conn.execute(sa.select(tasks.c.hold_id, tasks.c.slot_id, tasks.c.key_id)
                       .where(tasks.c.id == task_id)).one()
    if row.hold_id is not None:
        holds.settle(conn, row.hold_id, captured_micros if status == "succeeded" else 0)
    if row.slot_id is not None:
        release_slot(conn, row.slot_id)
    webhooks.enqueue(conn, task_id, row.key_id or "-", status)  # the outbox: in this transaction
    return True


def renew(conn: Connection, owner: str, task_ids: set[str], lease_s: float) -> set[str]:
    """Extend the leases of the tasks this replica is running now, and return those still active
    (the others were cancelled or swept elsewhere: the replica stops running them). A row of ours
    that no coroutine runs any more (its end could not be written) is not renewed: it lapses and
    a sweep fails it and releases its hold."""
    if not task_ids:
        return set()
    mine = (tasks.c.id.in_(sorted(task_ids)), tasks.c.lease_owner == owner, tasks.c.status.in_(ACTIVE))
    conn.execute(tasks.update().where(*mine).values(lease_until=time.time() + lease_s))
    rows = conn.execute(sa.select(tasks.c.id).where(*mine))
    return {row.id for row in rows}


def lapsed(conn: Connection, now: float) -> list[str]:
    """Active tasks whose lease lapsed before `now`: their replica is gone."""
    rows = conn.execute(sa.select(tasks.c.id).where(tasks.c.status.in_(ACTIVE), tasks.c.lease_until < now))
    return [row.id for row in rows]


def delete_expired(conn: Connection) -> int:
    """Forget finished tasks past their TTL (their artifacts expire on their own)."""
    gone = conn.execute(tasks.delete().where(tasks.c.expires_at < time.time(), tasks.c.status.not_in(ACTIVE)))
    return gone.rowcount
