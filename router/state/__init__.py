"""The state store: API keys, their credit ledger and holds, async tasks, idempotency records and
per-key limits, behind one async interface (SQLite or PostgreSQL)."""

from .money import format_usd, usd_to_micros
from .admission import Claim
from .records import InsufficientCredit, KeyNotFound, KeyRecord, LedgerEntry, Replay, StateError, TaskRecord
from .store import Store, open_store

open = open_store  # noqa: A001 - the interface is `state.open(url)`; the builtin is not used here

__all__ = ["Claim", "Replay", "TaskRecord", "InsufficientCredit", "KeyNotFound", "KeyRecord", "LedgerEntry", "StateError", "Store", "format_usd", "open",
           "open_store", "usd_to_micros"]
