"""Idempotency-Key records: claimed by the first request with a key, then holding its answer for
replays until they expire. Shared by every replica on the same database."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import orjson
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from .records import Begin, Replay
from .schema import idempotency


@dataclass(frozen=True)
class Claim:
    """What to do with a request carrying an Idempotency-Key."""
    action: Literal["run", "replay", "conflict", "wait"]
    replay: Replay | None = None


async def claim(begin: Begin, scope: str, key: str, fingerprint: str, owner: str,
                lease_s: float, ttl_s: float) -> Claim:
    now = time.time()
    try:
        async with begin() as conn:
            await conn.execute(idempotency.delete().where(idempotency.c.scope == scope, idempotency.c.key == key,
                                                          idempotency.c.expires_at < now))
            await conn.execute(idempotency.insert().values(
                scope=scope, key=key, fingerprint=fingerprint, status="pending", owner=owner,
                lease_until=now + lease_s, status_code=None, headers=None, body=None, expires_at=now + ttl_s))
        return Claim("run")
    except IntegrityError:
        pass  # a record exists: read it in a fresh transaction (PostgreSQL aborted this one)
    where = (idempotency.c.scope == scope, idempotency.c.key == key)
    async with begin() as conn:
        row = (await conn.execute(sa.select(idempotency).where(*where))).first()
        if row is None:
            return Claim("wait")  # it was just abandoned: the caller tries again
        if row.fingerprint != fingerprint:
            return Claim("conflict")
        if row.status == "done":
            return Claim("replay", Replay(row.status_code, orjson.loads(row.headers), row.body))
        if row.lease_until >= now:
            return Claim("wait")
        taken = await conn.execute(idempotency.update()
                                   .where(*where, idempotency.c.status == "pending", idempotency.c.lease_until < now)
                                   .values(owner=owner, lease_until=now + lease_s))
        return Claim("run" if taken.rowcount == 1 else "wait")  # its first runner died: ours now


async def complete(conn: AsyncConnection, scope: str, key: str, owner: str, response: Replay) -> None:
    await conn.execute(idempotency.update()
                       .where(idempotency.c.scope == scope, idempotency.c.key == key,
                              idempotency.c.owner == owner, idempotency.c.status == "pending")
                       .values(status="done", status_code=response.status_code,
                               headers=orjson.dumps(response.headers).decode(), body=response.body))


async def abandon(conn: AsyncConnection, scope: str, key: str, owner: str) -> None:
    """The first try failed: forget it, so that a retry with the same key runs again."""
    await conn.execute(idempotency.delete()
                       .where(idempotency.c.scope == scope, idempotency.c.key == key,
                              idempotency.c.owner == owner, idempotency.c.status == "pending"))


async def delete_expired(conn: AsyncConnection) -> int:
    gone = await conn.execute(idempotency.delete().where(idempotency.c.expires_at < time.time()))
    return gone.rowcount
