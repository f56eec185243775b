"""The state store: API keys, their credit ledger and holds, async tasks, idempotency records,
per-key limits and webhook deliveries, behind one async interface (SQLite or PostgreSQL)."""

from ..money import format_usd, usd_to_micros
from .records import (
    DeliveryRecord,
    InsufficientCredit,
    KeyNotFound,
    KeyRecord,
    LedgerEntry,
    Replay,
    StateError,
    TaskRecord,
)
from .replays import Claim
from .store import Store, open_store, probe_store

open = open_store

__all__ = ["Claim", "DeliveryRecord", "InsufficientCredit", "KeyNotFound", "KeyRecord", "LedgerEntry", "Replay",
           "StateError", "Store", "TaskRecord", "format_usd", "open", "open_store", "probe_store", "usd_to_micros"]
