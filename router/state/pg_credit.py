"""A request's credit hold, and its settlement with its slot's release, each as one statement on
PostgreSQL, which runs the data-modifying CTEs (WITH … UPDATE/INSERT/DELETE) of one statement
atomically. In autocommit that is one round trip each, instead of BEGIN, two to four statements
and COMMIT, and the key's row stays locked for one statement rather than for all those round
trips (README, Performance). The ledger scheme is holds.py's; holds.py keeps the transaction
form (credit.py), for SQLite (which has no data-modifying CTEs) and for admissions with limits.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .holds import check_amount, must_exist, new_hold_id, refusal
from .records import AdmitOutcome, InsufficientCredit, KeyRevoked
from .schema import api_keys, holds, ledger, slots

_LEDGER_ROW = ["key_id", "at", "kind", "amount_micros", "reference"]
_HOLD_ROW = ["id", "key_id", "amount_micros", "captured_micros", "status", "reference", "created_at"]


def _param(name: str, column: sa.Column[Any]) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=column.type)


def _kind(kind: str) -> sa.BindParameter[Any]:
    return sa.literal(kind, ledger.c.kind.type)


def _take() -> sa.Select[Any]:
    """Take :micros from key :key (if it has that much and is not revoked), post the `hold`
    ledger row and place hold :hold, all or nothing; selects the key's id when taken."""
    micros, at, hold_id = _param("micros", api_keys.c.balance_micros), _param("at", ledger.c.at), \
        _param("hold", holds.c.id)
    took = (api_keys.update()
            .where(api_keys.c.id == _param("key", api_keys.c.id), api_keys.c.balance_micros.is_not(None),
                   api_keys.c.balance_micros >= micros, api_keys.c.revoked_at.is_(None))
            .values(balance_micros=api_keys.c.balance_micros - micros)
            .returning(api_keys.c.id).cte("took"))
    posted = ledger.insert().from_select(_LEDGER_ROW, sa.select(took.c.id, at, _kind("hold"), -micros, hold_id))
    placed = holds.insert().from_select(_HOLD_ROW, sa.select(
        hold_id, took.c.id, micros, sa.null(), sa.literal("held", holds.c.status.type),
        _param("reference", holds.c.reference), at))
    return sa.select(took.c.id).add_cte(posted.cte("posted"), placed.cte("placed"))


def _settle() -> sa.Select[Any]:
    """Settle hold :hold if it is still `held` (capture min(:asked, its amount), give the rest back
    to its key, post the ledger rows) and delete slot :slot; selects the hold's key when flipped.
    The `release` row is posted only with the money given back, so the ledger stays exact even for
    a key that keeps no balance (which no hold is placed on)."""
    flipped = (holds.update()
               .where(holds.c.id == _param("hold", holds.c.id), holds.c.status == "held")
               .values(status="settled", captured_micros=sa.func.least(
                   holds.c.amount_micros, _param("asked", holds.c.captured_micros)))
               .returning(holds.c.key_id, holds.c.amount_micros, holds.c.captured_micros).cte("flipped"))
    remainder = flipped.c.amount_micros - flipped.c.captured_micros
    given = (api_keys.update()
             .where(api_keys.c.id == flipped.c.key_id, remainder > 0, api_keys.c.balance_micros.is_not(None))
             .values(balance_micros=api_keys.c.balance_micros + remainder)
             .returning(api_keys.c.id).cte("given"))
    at, hold_id = _param("at", ledger.c.at), _param("hold", holds.c.id)
    capture = sa.select(flipped.c.key_id, at, _kind("capture"), sa.literal(0),
                        sa.func.concat(hold_id, " captured=", flipped.c.captured_micros)
                        ).where(flipped.c.captured_micros > 0)
    release = sa.select(given.c.id, at, _kind("release"), remainder, hold_id) \
        .select_from(given.join(flipped, sa.true()))
    posted = ledger.insert().from_select(_LEDGER_ROW, sa.union_all(capture, release))
    freed = slots.delete().where(slots.c.id == _param("slot", slots.c.id))
    return sa.select(flipped.c.key_id).add_cte(posted.cte("posted"), freed.cte("freed"))


# Built once, at import: building a statement this size costs more than running it.
_TAKE, _SETTLE = _take(), _settle()


def admit(conn: Connection, key_id: str, micros: int, reference: str | None) -> AdmitOutcome:
    """The credit hold of a request on a key without rate or concurrency limits, on an autocommit
    connection: one statement, and a read only when it was refused. Raises KeyNotFound."""
    check_amount(micros)
    hold_id = new_hold_id()
    params = {"key": key_id, "micros": micros, "hold": hold_id, "reference": reference, "at": time.time()}
    taken = conn.execute(_TAKE, params).first() is not None
    conn.commit()  # no round trip in autocommit; on a connection that is not, what makes it last
    if taken:
        return AdmitOutcome(hold_id=hold_id)
    why = refusal(conn, key_id, micros)
    if isinstance(why, InsufficientCredit | KeyRevoked):
        return AdmitOutcome("credit" if isinstance(why, InsufficientCredit) else "revoked")
    raise why


def settle(conn: Connection, hold_id: str | None, captured_micros: int, slot_id: str | None) -> bool:
    """holds.settle of the hold (if any) and the slot's release (if any), on an autocommit
    connection: one statement, and a read only when the hold was settled already."""
    params = {"hold": hold_id, "asked": max(0, int(captured_micros)), "slot": slot_id, "at": time.time()}
    settled = conn.execute(_SETTLE, params).first() is not None
    conn.commit()  # as in admit
    if settled:
        return True
    if hold_id is not None:
        must_exist(conn, hold_id)
    return False
