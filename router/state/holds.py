"""Credit holds: money set aside before a request is routed, then captured (what was delivered) and
released (the rest). Plain functions over a connection, in the caller's transaction.

Ledger scheme, which keeps SUM(ledger.amount_micros) == balance_micros at every commit:
- `hold`    −amount   when placed (the balance drops by the whole hold at once);
- `release` +remainder when settled, for what was not delivered (the whole hold on a failure);
- `capture` 0          when settled with something delivered: a marker whose reference reads
  "<hold id> captured=<micros>". The captured money already left the balance with the hold.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import keys
from .keygen import new_key_id
from .records import InsufficientCredit, KeyRevoked, StateError
from .schema import api_keys, holds, ledger

# Built once: every request holds, and building a statement costs more than running it on SQLite.
_TAKE = (api_keys.update()
         .where(api_keys.c.id == sa.bindparam("key"), api_keys.c.balance_micros.is_not(None),
                api_keys.c.balance_micros >= sa.bindparam("micros"), api_keys.c.revoked_at.is_(None))
         .values(balance_micros=api_keys.c.balance_micros - sa.bindparam("micros")))
_POST_LEDGER = ledger.insert()
_NEW_HOLD = holds.insert()
_FLIP = (holds.update()
         .where(holds.c.id == sa.bindparam("hold"), holds.c.status == "held")
         .values(status="settled",
                 captured_micros=sa.case((holds.c.amount_micros < sa.bindparam("asked"), holds.c.amount_micros),
                                         else_=sa.bindparam("asked")))
         .returning(holds.c.key_id, holds.c.amount_micros, holds.c.captured_micros))
_GIVE_BACK = (api_keys.update()
              .where(api_keys.c.id == sa.bindparam("key"), api_keys.c.balance_micros.is_not(None))
              .values(balance_micros=api_keys.c.balance_micros + sa.bindparam("micros")))


def new_hold_id() -> str:
    return "hold_" + new_key_id().removeprefix("key_")


def take(conn: Connection, key_id: str, micros: int, reference: str | None) -> str:
    """Take `micros` from the key's balance, or raise InsufficientCredit having taken nothing.

    One conditional UPDATE (`balance >= :m` in its WHERE) decides: no read-then-write, so
    concurrent holds on one key, from any number of replicas, can never overdraw it.
    """
    check_amount(micros)
    hold_id, now = new_hold_id(), time.time()
    if conn.execute(_TAKE, {"key": key_id, "micros": micros}).rowcount != 1:
        raise refusal(conn, key_id, micros)
    conn.execute(_POST_LEDGER, {"key_id": key_id, "at": now, "kind": "hold", "amount_micros": -micros,
                                "reference": hold_id})
    conn.execute(_NEW_HOLD, {"id": hold_id, "key_id": key_id, "amount_micros": micros, "captured_micros": None,
                             "status": "held", "reference": reference, "created_at": now})
    return hold_id


def check_amount(micros: int) -> None:
    if isinstance(micros, bool) or not isinstance(micros, int) or micros < 0:
        raise StateError("a hold must be a whole number of micro-dollars, zero or more")


def refusal(conn: Connection, key_id: str, micros: int) -> StateError:
    """Why a hold of `micros` on the key took nothing: KeyRevoked, InsufficientCredit, or a
    StateError for an unlimited key; raises KeyNotFound."""
    key = keys.get(conn, key_id)
    if key.revoked:
        return KeyRevoked(key_id)
    if key.balance_micros is None:
        return StateError(f"API key '{key_id}' is unlimited (it keeps no balance)")
    return InsufficientCredit(key_id, micros)


def settle(conn: Connection, hold_id: str, captured_micros: int) -> bool:
    """Capture `captured_micros` (at most the hold) and give the rest back. Idempotent: only the
    first settle of a hold moves money (the status flip is conditional); later ones return False.

    One UPDATE … RETURNING both flips the hold (only if still `held`) and reads what it was:
    a round trip fewer than reading first, and the flip stays the one thing that decides."""
    flipped = conn.execute(_FLIP, {"hold": hold_id, "asked": max(0, int(captured_micros))}).first()
    if flipped is None:
        must_exist(conn, hold_id)
        return False  # settled already (maybe by another replica's sweep)
    key_id, amount, captured = flipped
    remainder, now = amount - captured, time.time()
    rows = []  # both ledger rows in one INSERT: a statement less on every request
    if captured:
        rows.append({"key_id": key_id, "at": now, "kind": "capture", "amount_micros": 0,
                     "reference": f"{hold_id} captured={captured}"})
    if remainder:
        if conn.execute(_GIVE_BACK, {"key": key_id, "micros": remainder}).rowcount != 1:
            raise StateError(f"API key '{key_id}' of hold '{hold_id}' keeps no balance")
        rows.append({"key_id": key_id, "at": now, "kind": "release", "amount_micros": remainder,
                     "reference": hold_id})
    if rows:
        conn.execute(_POST_LEDGER, rows)
    return True


def must_exist(conn: Connection, hold_id: str) -> None:
    if conn.execute(sa.select(holds.c.id).where(holds.c.id == hold_id)).first() is None:
        raise StateError(f"hold '{hold_id}' not found")


def placed_before(conn: Connection, cutoff: float) -> list[str]:
    """Holds still `held` that were placed before `cutoff` (unix seconds)."""
    rows = conn.execute(sa.select(holds.c.id).where(holds.c.status == "held", holds.c.created_at < cutoff))
    return [row.id for row in rows]


def held(conn: Connection, key_id: str) -> list[str]:
    """The ids of the key's holds not settled yet."""
    rows = conn.execute(sa.select(holds.c.id).where(holds.c.key_id == key_id, holds.c.status == "held"))
    return [row.id for row in rows]
