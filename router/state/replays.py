"""Idempotency-Key records: claimed by the first request with a key, then holding its answer for
replays until they expire. Shared by every replica on the same database."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from .records import Replay
from .runner import Runner
from .schema import idempotency


@dataclass(frozen=True)
class Claim:
    """What to do with a request carrying an Idempotency-Key."""
    action: Literal["run", "replay", "conflict", "wait"]
    replay: Replay | None = None


async def claim(runner: Runner, scope: str, key: str, fingerprint: str, owner: str,
                lease_s: float, ttl_s: float) -> Claim:
    """Two transactions at most: the insert that claims a new key, else a look at its record."""
    now = time.time()
    try:
        await runner.write(_insert, scope, key, fingerprint, owner, now, lease_s, ttl_s)
        return Claim("run")
    except IntegrityError:
        pass  # a record exists: read it in a fresh transaction (PostgreSQL aborted this one)
    return await runner.write(_existing, scope, key, fingerprint, owner, now, lease_s)


def _insert(conn: Connection, scope: str, key: str, fingerprint: str, owner: str, now: float,
            lease_s: float, ttl_s: float) -> None:
    conn.execute(idempotency.delete().where(idempotency.c.scope == scope, idempotency.c.key == key,
                                            idempotency.c.expires_at < now))
    conn.execute(idempotency.insert().values(
        scope=scope, key=key, fingerprint=fingerprint, status="pending", owner=owner,
        lease_until=now + lease_s, status_code=None, headers=None, body=None, expires_at=now + ttl_s))


def _existing(conn: Connection, scope: str, key: str, fingerprint: str, owner: str, now: float,
              lease_s: float) -> Claim:
    where = (idempotency.c.scope == scope, idempotency.c.key == key)
    row = conn.execute(sa.select(idempotency).where(*where)).first()
    if row is None:
        return Claim("wait")  # it was just abandoned: the caller tries again
    if row.fingerprint != fingerprint:
        return Claim("conflict")
    if row.status == "done":
        return Claim("replay", Replay(row.status_code, orjson.loads(row.headers), row.body))
    if row.lease_until >= now:
        return Claim("wait")
    taken = conn.execute(idempotency.update()
                         .where(*where, idempotency.c.status == "pending", idempotency.c.lease_until < now)
                         .values(owner=owner, lease_until=now + lease_s))
    return Claim("run" if taken.rowcount == 1 else "wait")  # its first runner died: ours now


def complete(conn: Connection, scope: str, key: str, owner: str, response: Replay) -> None:
    conn.execute(idempotency.update()
                 .where(idempotency.c.scope == scope, idempotency.c.key == key,
                        idempotency.c.owner == owner, idempotency.c.status == "pending")
                 .values(status="done", status_code=response.status_code,
                         headers=orjson.dumps(response.headers).decode(), body=response.body))


def abandon(conn: Connection, scope: str, key: str, owner: str) -> None:
    """The first try failed: forget it, so that a retry with the same key runs again."""
    conn.execute(idempotency.delete()
                 .where(idempotency.c.scope == scope, idempotency.c.key == key,
                        idempotency.c.owner == owner, idempotency.c.status == "pending"))


def delete_expired(conn: Connection) -> int:
    gone = conn.execute(idempotency.delete().where(idempotency.c.expires_at < time.time()))
    return gone.rowcount
