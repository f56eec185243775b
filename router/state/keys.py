"""API keys and their ledger: plain functions over a connection, in the caller's transaction.

The ledger invariant, kept by `post` and by the holds (holds.py): for every key that keeps a
balance, SUM(ledger.amount_micros) == balance_micros at every commit.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .keygen import DISPLAY_CHARS, hash_secret, looks_like_key, new_key_id, new_secret
from .records import KeyNotFound, KeyRecord, LedgerEntry, LedgerKind, StateError
from .schema import api_keys, ledger


def record(row: sa.Row[Any]) -> KeyRecord:
    models = json.loads(row.models) if row.models is not None else None
    return KeyRecord(id=row.id, name=row.name, prefix=row.prefix, created_at=row.created_at,
                     revoked_at=row.revoked_at, balance_micros=row.balance_micros,
                     models=tuple(models) if models is not None else None, rpm=row.rpm,
                     concurrency=row.concurrency)


def entry(row: sa.Row[Any]) -> LedgerEntry:
    return LedgerEntry(id=row.id, key_id=row.key_id, at=row.at, kind=row.kind,
                       amount_micros=row.amount_micros, reference=row.reference)


def _positive_or_none(value: int | None, what: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise StateError(f"{what} must be a whole number of at least 1")
    return value


def create(conn: Connection, name: str, credits_micros: int | None, models: Sequence[str] | None,
           rpm: int | None, concurrency: int | None) -> tuple[KeyRecord, str]:
    """A new key and its secret; the secret is returned here once and never stored."""
    if not name.strip():
        raise StateError("a key needs a name")
    if credits_micros is not None and credits_micros < 0:
        raise StateError("credits must be zero or more")
    secret, key_id, now = new_secret(), new_key_id(), time.time()
    values = {"id": key_id, "name": name.strip(), "prefix": secret[:DISPLAY_CHARS],
              "key_hash": hash_secret(secret), "created_at": now, "revoked_at": None,
              "balance_micros": 0 if credits_micros is not None else None,
              "models": json.dumps(sorted(set(models))) if models is not None else None,
              "rpm": _positive_or_none(rpm, "rpm"),
              "concurrency": _positive_or_none(concurrency, "concurrency")}
    conn.execute(api_keys.insert().values(**values))
    if credits_micros:
        post(conn, key_id, "topup", credits_micros, "initial credits")
    return get(conn, key_id), secret


def get(conn: Connection, key_id: str) -> KeyRecord:
    row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
    if row is None:
        raise KeyNotFound(key_id)
    return record(row)


def list_all(conn: Connection) -> list[KeyRecord]:
    rows = conn.execute(sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id))
    return [record(row) for row in rows]


def revoke(conn: Connection, key_id: str) -> KeyRecord:
    """Revoking twice keeps the first time; the key and its ledger stay for the record."""
    conn.execute(api_keys.update()
                 .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                 .values(revoked_at=time.time()))
    return get(conn, key_id)


def top_up(conn: Connection, key_id: str, micros: int, reference: str | None) -> KeyRecord:
    post(conn, key_id, "topup", micros, reference)
    return get(conn, key_id)


def by_secret(conn: Connection, secret: str) -> KeyRecord | None:
    """The live key whose secret this is, else None (unknown, malformed or revoked alike)."""
    if not looks_like_key(secret):
        return None
    digest = hash_secret(secret)
    row = conn.execute(sa.select(api_keys).where(api_keys.c.key_hash == digest)).first()
    # The lookup is by hash, so timing says nothing about the secret; compare again anyway so a
    # collation or driver quirk in the WHERE can never let a near-miss through.
    if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
        return None
    return record(row)


def post(conn: Connection, key_id: str, kind: LedgerKind, amount: int, reference: str | None) -> None:
    """One ledger row and the same change to the balance, in the caller's transaction.

    The balance moves by an in-place `balance + amount` (no read-modify-write), so concurrent
    postings from several replicas cannot lose each other. Holds (holds.py) take money with
    their own UPDATE that adds a `balance >= amount` condition, refusing overdrafts atomically.
    """
    done = conn.execute(api_keys.update()
                        .where(api_keys.c.id == key_id, api_keys.c.balance_micros.is_not(None))
                        .values(balance_micros=api_keys.c.balance_micros + amount))
    if done.rowcount != 1:
        get(conn, key_id)  # raises KeyNotFound when that is the reason
        raise StateError(f"API key '{key_id}' is unlimited (it keeps no balance); "
                         "make a key with credits to meter it")
    conn.execute(ledger.insert().values(key_id=key_id, at=time.time(), kind=kind,
                                        amount_micros=amount, reference=reference))


def entries(conn: Connection, key_id: str, *, newest_first: bool = False,
            limit: int | None = None) -> list[LedgerEntry]:
    """The key's ledger; an unknown key is an error, not an empty history."""
    get(conn, key_id)
    order = ledger.c.id.desc() if newest_first else ledger.c.id
    query = sa.select(ledger).where(ledger.c.key_id == key_id).order_by(order).limit(limit)
    return [entry(row) for row in conn.execute(query)]
