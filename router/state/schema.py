"""Tables (SQLAlchemy Core) and the project's own migrations: `schema_version` holds the number of the
last migration applied; each start applies the ones after it, in order, in one transaction.

Adding state later (holds, tasks, idempotency records, tenants) is a new function appended to
MIGRATIONS — never an edit of an applied one, since databases in the field already ran it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

log = logging.getLogger("imagegate.state")

metadata = sa.MetaData()

# SQLite only auto-numbers an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
_SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # always 1: a single row
    sa.Column("version", sa.Integer, nullable=False),
)

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.String(40), primary_key=True),  # "key_…", random: replicas never collide
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),  # sha256 hex of the secret
    sa.Column("created_at", sa.Double, nullable=False),  # unix seconds
    sa.Column("revoked_at", sa.Double, nullable=True),
    sa.Column("balance_micros", sa.BigInteger, nullable=True),  # NULL: unlimited, no ledger kept
    sa.Column("models", sa.Text, nullable=True),  # JSON list of model ids; NULL: every model
    sa.Column("rpm", sa.Integer, nullable=True),
    sa.Column("concurrency", sa.Integer, nullable=True),
)

ledger = sa.Table(
    "ledger", metadata,
    sa.Column("id", _SERIAL, primary_key=True, autoincrement=True),
    sa.Column("key_id", sa.String(40), sa.ForeignKey("api_keys.id"), nullable=False, index=True),
    sa.Column("at", sa.Double, nullable=False),
    # topup | hold | capture | release | adjust; holds name what they are for in `reference`
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("amount_micros", sa.BigInteger, nullable=False),
    sa.Column("reference", sa.String(200), nullable=True),  # request/task/hold id, or an operator note
)

holds = sa.Table(
    "holds", metadata,
    sa.Column("id", sa.String(40), primary_key=True),  # "hold_…", random
    sa.Column("key_id", sa.String(40), sa.ForeignKey("api_keys.id"), nullable=False, index=True),
    sa.Column("amount_micros", sa.BigInteger, nullable=False),  # taken from the balance when placed
    sa.Column("captured_micros", sa.BigInteger, nullable=True),  # set when settled; the rest went back
    sa.Column("status", sa.String(16), nullable=False, index=True),  # held | settled
    sa.Column("reference", sa.String(200), nullable=True),  # the request id it was placed for
    sa.Column("created_at", sa.Double, nullable=False),
)


tasks = sa.Table(
    "tasks", metadata,
    sa.Column("id", sa.String(40), primary_key=True),  # "task_…", random
    sa.Column("key_id", sa.String(40), nullable=True, index=True),  # NULL with auth off: one tenant
    sa.Column("status", sa.String(16), nullable=False, index=True),  # queued|running|succeeded|failed|canceled
    sa.Column("progress", sa.Double, nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("operation", sa.String(16), nullable=False),
    sa.Column("response_format", sa.String(16), nullable=False),
    sa.Column("hold_id", sa.String(40), nullable=True),
    sa.Column("slot_id", sa.String(40), nullable=True),  # the key's concurrency slot, freed on finish
    sa.Column("billing", sa.Text, nullable=False),  # JSON: the price as known at submit
    sa.Column("result", sa.Text, nullable=True),  # JSON: the response body, images as artifact ids
    sa.Column("error", sa.Text, nullable=True),  # JSON: the OpenAI-shaped error object
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("started_at", sa.Double, nullable=True),
    sa.Column("finished_at", sa.Double, nullable=True),
    sa.Column("expires_at", sa.Double, nullable=False, index=True),
    # The replica running it and until when; a lapsed lease means that replica is gone.
    sa.Column("lease_owner", sa.String(40), nullable=True),
    sa.Column("lease_until", sa.Double, nullable=True, index=True),
)

idempotency = sa.Table(
    "idempotency", metadata,
    sa.Column("scope", sa.String(40), primary_key=True),  # the API key id, or "-" with auth off
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),  # sha256 of endpoint + canonical body
    sa.Column("status", sa.String(16), nullable=False),  # pending | done
    sa.Column("owner", sa.String(40), nullable=False),  # the replica running the first request
    sa.Column("lease_until", sa.Double, nullable=False),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("headers", sa.Text, nullable=True),  # JSON object
    sa.Column("body", sa.LargeBinary, nullable=True),
    sa.Column("expires_at", sa.Double, nullable=False, index=True),
)

rate_windows = sa.Table(
    "rate_windows", metadata,
    sa.Column("key_id", sa.String(40), primary_key=True),
    sa.Column("window", sa.BigInteger, nullable=False),  # the clock minute: unix seconds // 60
    sa.Column("count", sa.Integer, nullable=False),
)

slots = sa.Table(
    "slots", metadata,  # one row per request or task in flight on a key with a concurrency limit
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("key_id", sa.String(40), nullable=False, index=True),
    sa.Column("expires_at", sa.Double, nullable=False),  # a crashed replica's slots lapse by themselves
)

preferences = sa.Table(
    "preferences", metadata,  # a caller's settings that outlive a request (A1111's sd_model_checkpoint)
    sa.Column("scope", sa.String(40), primary_key=True),  # the API key id, or "-" with auth off
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


# Webhooks (README "Webhooks"): a task's callback URL, the outbox of its deliveries, the keys'
# signing secrets and the URLs a receiver turned off with 410. Tables of their own, so the
# migration only creates (no ALTER of a table that holds data).
task_webhooks = sa.Table(
    "task_webhooks", metadata,
    sa.Column("task_id", sa.String(40), primary_key=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("base_url", sa.Text, nullable=False),  # where the caller reached us: the event's links
)

webhook_deliveries = sa.Table(
    "webhook_deliveries", metadata,  # the outbox: written in the transaction that ends the task
    sa.Column("id", sa.String(40), primary_key=True),  # the webhook-id, the same on every attempt
    sa.Column("task_id", sa.String(40), nullable=False, index=True),
    sa.Column("scope", sa.String(40), nullable=False),  # the key id, or "-" with auth off
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("event", sa.String(40), nullable=False),  # image.task.succeeded | failed | canceled
    sa.Column("payload", sa.Text, nullable=True),  # the event body, made at the first attempt
    sa.Column("status", sa.String(16), nullable=False, index=True),  # pending|delivered|failed|disabled
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", sa.Double, nullable=False, index=True),
    sa.Column("lease_owner", sa.String(40), nullable=True),  # the replica sending it now
    sa.Column("lease_until", sa.Double, nullable=True),
    sa.Column("last_status", sa.Integer, nullable=True),  # the receiver's HTTP status
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("finished_at", sa.Double, nullable=True),
)

webhook_secrets = sa.Table(
    "webhook_secrets", metadata,
    sa.Column("scope", sa.String(40), primary_key=True),  # the key id
    # Kept as given: an HMAC needs the secret itself. Shown to the client once, when made.
    sa.Column("secret", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

webhook_disabled = sa.Table(
    "webhook_disabled", metadata,  # the receiver answered 410 Gone
    sa.Column("scope", sa.String(40), primary_key=True),
    sa.Column("url", sa.String(2048), primary_key=True),
    sa.Column("disabled_at", sa.Double, nullable=False),
)


def _v1(conn: Connection) -> None:
    """Keys and their ledger."""
    schema_version.create(conn, checkfirst=True)
    api_keys.create(conn, checkfirst=True)
    ledger.create(conn, checkfirst=True)


def _v2(conn: Connection) -> None:
    """Credit holds."""
    holds.create(conn, checkfirst=True)


def _v3(conn: Connection) -> None:
    """Async tasks, idempotency records, per-key rate windows and concurrency slots."""
    for table in (tasks, idempotency, rate_windows, slots):
        table.create(conn, checkfirst=True)


def _v4(conn: Connection) -> None:
    """Per-caller preferences."""
    preferences.create(conn, checkfirst=True)


def _v5(conn: Connection) -> None:
    """Webhooks: task callback URLs, the delivery outbox, signing secrets, disabled URLs."""
    for table in (task_webhooks, webhook_deliveries, webhook_secrets, webhook_disabled):
        table.create(conn, checkfirst=True)


MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3, _v4, _v5]
LATEST = len(MIGRATIONS)


def table_schema(conn: Connection) -> str | None:
    """The schema our unqualified tables land in (see `schema_translate_map` in store.py): the
    inspector does not apply that map itself."""
    return (conn.get_execution_options().get("schema_translate_map") or {}).get(None)


def current_version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table("schema_version", schema=table_schema(conn)):
        return 0
    return conn.execute(sa.select(schema_version.c.version).where(schema_version.c.id == 1)).scalar() or 0


def migrate(conn: Connection) -> int:
    """Bring the schema to LATEST inside the caller's transaction; returns the version found.

    Several replicas may start at once: on PostgreSQL a transaction-scoped advisory lock lets one
    migrate while the others wait and then find nothing to do; on SQLite the caller retries.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(0x696D67)))  # "img": any constant of ours
    found = current_version(conn)
    if found > LATEST:
        raise RuntimeError(f"the state store is at schema version {found}, newer than this imagegate "
                           f"({LATEST}); upgrade imagegate")
    for number, step in enumerate(MIGRATIONS[found:], start=found + 1):
        log.info("state store: applying migration %d (%s)", number, (step.__doc__ or "").strip())
        step(conn)
    if found == 0:
        conn.execute(schema_version.insert().values(id=1, version=LATEST))
    elif found < LATEST:
        conn.execute(schema_version.update().where(schema_version.c.id == 1).values(version=LATEST))
    return found
