"""A request's admission (rate limit, concurrency slot, credit hold) and its settlement (the hold
settled, the slot freed), each one transaction of holds.py's and limits.py's statements. On
PostgreSQL the common case is a single statement instead (pg_credit.py)."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from . import holds, limits
from .records import AdmitOutcome, InsufficientCredit, KeyRevoked


def admit(conn: Connection, key_id: str, *, rpm: int | None, concurrency: int | None, slot_ttl_s: float,
          hold_micros: int | None, reference: str | None) -> AdmitOutcome:
    """A refusal takes nothing (the rate count stays: the request was made)."""
    if rpm is not None and (wait_s := limits.count_in(conn, key_id, rpm)) is not None:
        return AdmitOutcome("rate", wait_s=wait_s)
    slot_id = None
    if concurrency is not None:
        slot_id = limits.acquire_slot(conn, key_id, concurrency, slot_ttl_s)
        if slot_id is None:
            return AdmitOutcome("concurrency")
    hold_id = None
    if hold_micros is not None:
        try:
            hold_id = holds.take(conn, key_id, hold_micros, reference)
        except (InsufficientCredit, KeyRevoked) as refused:
            if slot_id is not None:
                limits.release_slot(conn, slot_id)
            return AdmitOutcome("credit" if isinstance(refused, InsufficientCredit) else "revoked")
    return AdmitOutcome(slot_id=slot_id, hold_id=hold_id)


def settle(conn: Connection, hold_id: str | None, captured_micros: int, slot_id: str | None) -> bool:
    """holds.settle of the hold (if any) and the slot's release (if any)."""
    settled = hold_id is not None and holds.settle(conn, hold_id, captured_micros)
    if slot_id is not None:
        limits.release_slot(conn, slot_id)
    return settled
