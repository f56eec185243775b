"""Per-key limits: rate windows (requests per clock minute) and concurrency slots. Shared by every
replica on the same database.

Each check is one conditional write, as for credit holds, so two replicas can never both take
the last unit of a limit.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from .keygen import new_key_id
from .schema import api_keys, rate_windows, slots


def _step(key_id: str, rpm: int, window: int) -> sa.Update:
    return (rate_windows.update()
            .where(rate_windows.c.key_id == key_id,
                   sa.or_(rate_windows.c.window != window, rate_windows.c.count < rpm))
            .values(count=sa.case((rate_windows.c.window == window, rate_windows.c.count + 1), else_=1),
                    window=window))


def count_in(conn: Connection, key_id: str, rpm: int) -> int | None:
    """Count one request in the key's current clock minute: None when allowed, else the seconds
    until the minute ends; in the caller's transaction (admission's one round trip). The
    conditional UPDATE, and for a key's first request an INSERT … ON CONFLICT DO NOTHING (both
    databases), which waits for, rather than fails on, another replica's insert of the same row."""
    now = time.time()
    window = int(now // 60)
    if conn.execute(_step(key_id, rpm, window)).rowcount == 1:
        return None
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    first = dialect.insert(rate_windows).values(key_id=key_id, window=window, count=1).on_conflict_do_nothing()
    if conn.execute(first).rowcount == 1:
        return None
    if conn.execute(_step(key_id, rpm, window)).rowcount == 1:  # the row another replica just made
        return None
    return max(1, int((window + 1) * 60 - now + 0.999))


def acquire_slot(conn: Connection, key_id: str, limit: int, ttl_s: float) -> str | None:
    """A concurrency slot on the key, or None when `limit` are taken. The key's row is written
    first: on PostgreSQL that locks it, on SQLite it takes the write lock, so the count that
    follows cannot interleave with another replica's."""
    now = time.time()
    conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(concurrency=api_keys.c.concurrency))
    conn.execute(slots.delete().where(slots.c.key_id == key_id, slots.c.expires_at < now))
    taken = conn.execute(sa.select(sa.func.count()).select_from(slots)
                         .where(slots.c.key_id == key_id)).scalar_one()
    if taken >= limit:
        return None
    slot_id = "slot_" + new_key_id().removeprefix("key_")
    conn.execute(slots.insert().values(id=slot_id, key_id=key_id, expires_at=now + ttl_s))
    return slot_id


def release_slot(conn: Connection, slot_id: str) -> None:
    conn.execute(slots.delete().where(slots.c.id == slot_id))


def extend_slot(conn: Connection, slot_id: str, ttl_s: float) -> None:
    """Keep a long task's slot (its lease renewals call this)."""
    conn.execute(slots.update().where(slots.c.id == slot_id).values(expires_at=time.time() + ttl_s))
