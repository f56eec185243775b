"""Per-caller preferences: small named values kept across requests and replicas (the model an
AUTOMATIC1111 client selected with POST /sdapi/v1/options, for one)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from .runner import Runner
from .schema import preferences


def of(conn: Connection, scope: str) -> dict[str, str]:
    rows = conn.execute(sa.select(preferences.c.name, preferences.c.value)
                        .where(preferences.c.scope == scope))
    return {row.name: row.value for row in rows}


async def put(runner: Runner, scope: str, name: str, value: str) -> None:
    """Set one value: an update, or an insert for a first one (a racing insert of another replica
    makes it an update)."""
    for _ in range(2):
        if await runner.write(_update, scope, name, value):
            return
        try:
            await runner.write(_insert, scope, name, value)
            return
        except IntegrityError:
            continue


async def first(runner: Runner, scope: str, name: str, value: str) -> str:
    """The value kept under (scope, name), which is `value` if none was: the first writer wins, so
    replicas starting together agree (a gateway-wide generated secret, for one)."""
    try:
        await runner.write(_insert, scope, name, value)
        return value
    except IntegrityError:
        return await runner.read(_value, scope, name)


def _update(conn: Connection, scope: str, name: str, value: str) -> bool:
    where = (preferences.c.scope == scope, preferences.c.name == name)
    return conn.execute(preferences.update().where(*where).values(value=value)).rowcount == 1


def _insert(conn: Connection, scope: str, name: str, value: str) -> None:
    conn.execute(preferences.insert().values(scope=scope, name=name, value=value))


def _value(conn: Connection, scope: str, name: str) -> str:
    return str(conn.scalar(sa.select(preferences.c.value)
                           .where(preferences.c.scope == scope, preferences.c.name == name)))
