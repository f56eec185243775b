"""Plain records the store hands out, and its errors. No ORM objects leave the store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..money import format_usd

LedgerKind = Literal["topup", "hold", "capture", "release", "adjust"]


class StateError(Exception):
    """A request the store refuses (bad amount, a key without a balance…); the message says why."""


class KeyNotFound(StateError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"API key '{key_id}' not found")
        self.key_id = key_id


class KeyRevoked(StateError):
    """A request on a key revoked since it was authenticated; nothing was taken."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"API key '{key_id}' is revoked")


class InsufficientCredit(StateError):
    """A hold the key's balance cannot cover; nothing was taken."""

    def __init__(self, key_id: str, micros: int) -> None:
        super().__init__(f"API key '{key_id}' has less than {format_usd(micros)} USD of credit left")
        self.key_id, self.micros = key_id, micros


@dataclass(frozen=True, slots=True)
class AdmitOutcome:
    """What one request's admission took, in one transaction: its slot and hold, or why it was
    refused (`rate`: wait `wait_s`; `concurrency`; `credit`; `revoked`), having taken nothing but
    the count."""

    refused: Literal["rate", "concurrency", "credit", "revoked"] | None = None
    wait_s: int | None = None
    slot_id: str | None = None
    hold_id: str | None = None


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    prefix: str  # the first characters of the secret: enough to recognise a key, not to use it
    created_at: float
    revoked_at: float | None
    balance_micros: int | None  # None: no balance kept (unlimited)
    models: tuple[str, ...] | None  # None: every model
    rpm: int | None
    concurrency: int | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def allows(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models

    def public(self) -> dict[str, Any]:
        """The admin API / CLI view: everything but the secret (which the store never had)."""
        return {"id": self.id, "object": "api_key", "name": self.name, "prefix": self.prefix,
                "created_at": self.created_at, "revoked_at": self.revoked_at,
                "balance_micros": self.balance_micros, "balance": format_usd(self.balance_micros),
                "models": list(self.models) if self.models is not None else None,
                "rpm": self.rpm, "concurrency": self.concurrency}


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    key_id: str
    at: float
    kind: LedgerKind
    amount_micros: int  # signed: a topup adds, a hold takes away, a release gives back
    reference: str | None

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "key_id": self.key_id, "at": self.at, "kind": self.kind,
                "amount_micros": self.amount_micros, "reference": self.reference}


ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "canceled")


@dataclass(frozen=True)
class TaskRecord:
    id: str
    key_id: str | None
    status: str
    progress: float
    model: str
    operation: str
    response_format: str
    hold_id: str | None
    slot_id: str | None
    billing: dict[str, Any]
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float
    lease_owner: str | None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


@dataclass(frozen=True)
class Replay:
    """A stored response for an Idempotency-Key, sent again as it was."""
    status_code: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class DeliveryRecord:
    """One webhook event of a task and where its delivery stands."""
    id: str
    task_id: str
    scope: str
    url: str
    event: str
    payload: str | None
    status: str  # pending | delivered | failed | disabled
    attempts: int
    next_attempt_at: float
    last_status: int | None
    last_error: str | None
    created_at: float
    finished_at: float | None
