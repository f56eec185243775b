"""What decides whether a request may start: per-key rate windows and concurrency slots, and
Idempotency-Key records. Mixed into `Store`; shared by every replica on the same database.

Each check is one conditional write, as for credit holds, so two replicas can never both take
the last unit of a limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import orjson
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from .keygen import new_key_id
from .records import Replay
from .schema import api_keys, idempotency, rate_windows, slots


@dataclass(frozen=True)
class Claim:
    """What to do with a request carrying an Idempotency-Key."""
    action: Literal["run", "replay", "conflict", "wait"]
    replay: Replay | None = None


class AdmissionMixin:
    engine: AsyncEngine

    async def count_request(self, key_id: str, rpm: int) -> int | None:
        """Count one request in the key's current clock minute: None when allowed, else the seconds
        until the minute ends. The window's row is updated only while under the limit."""
        now = time.time()
        window = int(now // 60)
        step = (rate_windows.update()
                .where(rate_windows.c.key_id == key_id,
                       sa.or_(rate_windows.c.window != window, rate_windows.c.count < rpm))
                .values(count=sa.case((rate_windows.c.window == window, rate_windows.c.count + 1), else_=1),
                        window=window))
        for _ in range(2):  # a first request of a key may race another replica's insert
            async with self.engine.begin() as conn:
                if (await conn.execute(step)).rowcount == 1:
                    return None
                exists = (await conn.execute(sa.select(rate_windows.c.key_id)
                                             .where(rate_windows.c.key_id == key_id))).first()
                if exists is not None:
                    return max(1, int((window + 1) * 60 - now + 0.999))
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(rate_windows.insert().values(key_id=key_id, window=window, count=1))
                return None
            except IntegrityError:
                continue
        return 1

    async def acquire_slot(self, key_id: str, limit: int, ttl_s: float) -> str | None:
        """A concurrency slot on the key, or None when `limit` are taken. The key's row is written
        first: on PostgreSQL that locks it, on SQLite it takes the write lock, so the count that
        follows cannot interleave with another replica's."""
        now = time.time()
        async with self.engine.begin() as conn:
            await conn.execute(api_keys.update().where(api_keys.c.id == key_id)
                               .values(concurrency=api_keys.c.concurrency))
            await conn.execute(slots.delete().where(slots.c.key_id == key_id, slots.c.expires_at < now))
            taken = (await conn.execute(sa.select(sa.func.count()).select_from(slots)
                                        .where(slots.c.key_id == key_id))).scalar_one()
            if taken >= limit:
                return None
            slot_id = "slot_" + new_key_id().removeprefix("key_")
            await conn.execute(slots.insert().values(id=slot_id, key_id=key_id, expires_at=now + ttl_s))
        return slot_id

    async def release_slot(self, slot_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(slots.delete().where(slots.c.id == slot_id))

    async def extend_slot(self, slot_id: str, ttl_s: float) -> None:
        """Keep a long task's slot (its lease renewals call this)."""
        async with self.engine.begin() as conn:
            await conn.execute(slots.update().where(slots.c.id == slot_id).values(expires_at=time.time() + ttl_s))

    async def claim_idempotency(self, scope: str, key: str, fingerprint: str, owner: str,
                                lease_s: float, ttl_s: float) -> Claim:
        now = time.time()
        try:
            async with self.engine.begin() as conn:
                await conn.execute(idempotency.delete().where(idempotency.c.scope == scope, idempotency.c.key == key,
                                                              idempotency.c.expires_at < now))
                await conn.execute(idempotency.insert().values(
                    scope=scope, key=key, fingerprint=fingerprint, status="pending", owner=owner,
                    lease_until=now + lease_s, status_code=None, headers=None, body=None, expires_at=now + ttl_s))
            return Claim("run")
        except IntegrityError:
            pass  # a record exists: read it in a fresh transaction (PostgreSQL aborted this one)
        where = (idempotency.c.scope == scope, idempotency.c.key == key)
        async with self.engine.begin() as conn:
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
                                       .where(*where, idempotency.c.status == "pending",
                                              idempotency.c.lease_until < now)
                                       .values(owner=owner, lease_until=now + lease_s))
            return Claim("run" if taken.rowcount == 1 else "wait")  # its first runner died: ours now

    async def complete_idempotency(self, scope: str, key: str, owner: str, response: Replay) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(idempotency.update()
                               .where(idempotency.c.scope == scope, idempotency.c.key == key,
                                      idempotency.c.owner == owner, idempotency.c.status == "pending")
                               .values(status="done", status_code=response.status_code,
                                       headers=orjson.dumps(response.headers).decode(), body=response.body))

    async def abandon_idempotency(self, scope: str, key: str, owner: str) -> None:
        """The first try failed: forget it, so that a retry with the same key runs again."""
        async with self.engine.begin() as conn:
            await conn.execute(idempotency.delete()
                               .where(idempotency.c.scope == scope, idempotency.c.key == key,
                                      idempotency.c.owner == owner, idempotency.c.status == "pending"))

    async def delete_expired_idempotency(self) -> int:
        async with self.engine.begin() as conn:
            gone = await conn.execute(idempotency.delete().where(idempotency.c.expires_at < time.time()))
        return gone.rowcount
