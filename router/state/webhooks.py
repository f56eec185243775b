"""Webhook state: a task's callback URL (written with the task), the outbox row its end adds (in
the same transaction), and the claim, attempts and end of each delivery. A delivery is claimed by
one replica at a time through a lease, like a task, so an event goes out once however many
replicas send; a replica that dies mid-attempt leaves a lease that lapses and another resends.
Plain functions over a connection, in the caller's transaction."""

from __future__ import annotations

import secrets
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .records import DeliveryRecord
from .schema import task_webhooks, tasks, webhook_deliveries, webhook_disabled, webhook_secrets

EVENTS = {"succeeded": "image.task.succeeded", "failed": "image.task.failed", "canceled": "image.task.canceled"}


def _delivery(row: sa.Row[Any]) -> DeliveryRecord:
    return DeliveryRecord(id=row.id, task_id=row.task_id, scope=row.scope, url=row.url, event=row.event,
                          payload=row.payload, status=row.status, attempts=row.attempts,
                          next_attempt_at=row.next_attempt_at, last_status=row.last_status,
                          last_error=row.last_error, created_at=row.created_at, finished_at=row.finished_at)


def register(conn: Connection, task_id: str, url: str, base_url: str) -> None:
    conn.execute(task_webhooks.insert().values(task_id=task_id, url=url, base_url=base_url))


def callback_of(conn: Connection, task_id: str) -> tuple[str, str] | None:
    """The task's (webhook URL, base URL of its links), if it asked for one."""
    row = conn.execute(sa.select(task_webhooks.c.url, task_webhooks.c.base_url)
                       .where(task_webhooks.c.task_id == task_id)).first()
    return (row.url, row.base_url) if row is not None else None


def enqueue(conn: Connection, task_id: str, scope: str, status: str) -> None:
    """The task just ended as `status`: its event joins the outbox, if it asked for one."""
    url = conn.scalar(sa.select(task_webhooks.c.url).where(task_webhooks.c.task_id == task_id))
    if url is None:
        return
    now = time.time()
    conn.execute(webhook_deliveries.insert().values(
        id="msg_" + secrets.token_hex(12), task_id=task_id, scope=scope, url=url, event=EVENTS[status],
        payload=None, status="pending", attempts=0, next_attempt_at=now, lease_owner=None, lease_until=None,
        last_status=None, last_error=None, created_at=now, finished_at=None))


def of_task(conn: Connection, task_id: str) -> DeliveryRecord | None:
    row = conn.execute(sa.select(webhook_deliveries).where(webhook_deliveries.c.task_id == task_id)
                       .order_by(webhook_deliveries.c.created_at.desc())).first()
    return _delivery(row) if row is not None else None


def due(conn: Connection, now: float, limit: int) -> list[str]:
    d = webhook_deliveries.c
    rows = conn.execute(sa.select(d.id).where(d.status == "pending", d.next_attempt_at <= now,
                                              sa.or_(d.lease_until.is_(None), d.lease_until < now))
                        .order_by(d.next_attempt_at).limit(limit))
    return [row.id for row in rows]


def claim(conn: Connection, delivery_id: str, owner: str, until: float) -> DeliveryRecord | None:
    """This replica's, until `until`, unless another claimed it first (then None)."""
    d, now = webhook_deliveries.c, time.time()
    taken = conn.execute(webhook_deliveries.update().where(
        d.id == delivery_id, d.status == "pending", sa.or_(d.lease_until.is_(None), d.lease_until < now))
        .values(lease_owner=owner, lease_until=until))
    if taken.rowcount != 1:
        return None
    row = conn.execute(sa.select(webhook_deliveries).where(d.id == delivery_id)).one()
    return _delivery(row)


def attempted(conn: Connection, delivery_id: str, owner: str, *, status: str, payload: str,
              http_status: int | None, error: str | None, next_attempt_at: float) -> bool:
    """Record one attempt and what comes next (`status` pending: another at `next_attempt_at`)."""
    d = webhook_deliveries.c
    done = conn.execute(webhook_deliveries.update().where(d.id == delivery_id, d.lease_owner == owner).values(
        status=status, payload=payload, attempts=d.attempts + 1, last_status=http_status, last_error=error,
        next_attempt_at=next_attempt_at, lease_owner=None, lease_until=None,
        finished_at=None if status == "pending" else time.time()))
    return done.rowcount == 1


def disable(conn: Connection, scope: str, url: str) -> None:
    """The receiver said 410 Gone: no more events to that URL for this key."""
    if not is_disabled(conn, scope, url):
        conn.execute(webhook_disabled.insert().values(scope=scope, url=url, disabled_at=time.time()))
    d = webhook_deliveries.c
    conn.execute(webhook_deliveries.update().where(d.scope == scope, d.url == url, d.status == "pending")
                 .values(status="disabled", finished_at=time.time()))


def is_disabled(conn: Connection, scope: str, url: str) -> bool:
    found = conn.scalar(sa.select(sa.func.count()).select_from(webhook_disabled).where(
        webhook_disabled.c.scope == scope, webhook_disabled.c.url == url))
    return bool(found)


def secret_of(conn: Connection, scope: str) -> str | None:
    return conn.scalar(sa.select(webhook_secrets.c.secret).where(webhook_secrets.c.scope == scope))


def set_secret(conn: Connection, scope: str, secret: str) -> None:
    """A key's new signing secret; the URLs its receivers disabled get a fresh start with it."""
    conn.execute(webhook_secrets.delete().where(webhook_secrets.c.scope == scope))
    conn.execute(webhook_secrets.insert().values(scope=scope, secret=secret, created_at=time.time()))
    conn.execute(webhook_disabled.delete().where(webhook_disabled.c.scope == scope))


def delete_expired(conn: Connection, before: float) -> int:
    """Forget finished deliveries older than `before`, and callback URLs of tasks that are gone."""
    d = webhook_deliveries.c
    gone = conn.execute(webhook_deliveries.delete().where(d.status != "pending", d.finished_at < before))
    conn.execute(task_webhooks.delete().where(task_webhooks.c.task_id.not_in(sa.select(tasks.c.id))))
    return gone.rowcount
