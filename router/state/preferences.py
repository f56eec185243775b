"""Per-caller preferences: small named values kept across requests and replicas (the model an
AUTOMATIC1111 client selected with POST /sdapi/v1/options, for one)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from .records import Begin
from .schema import preferences


async def of(conn: AsyncConnection, scope: str) -> dict[str, str]:
    rows = await conn.execute(sa.select(preferences.c.name, preferences.c.value)
                              .where(preferences.c.scope == scope))
    return {row.name: row.value for row in rows}


async def put(begin: Begin, scope: str, name: str, value: str) -> None:
    """Set one value: an update, or an insert for a first one (a racing insert of another replica
    makes it an update)."""
    where = (preferences.c.scope == scope, preferences.c.name == name)
    for _ in range(2):
        async with begin() as conn:
            if (await conn.execute(preferences.update().where(*where).values(value=value))).rowcount == 1:
                return
        try:
            async with begin() as conn:
                await conn.execute(preferences.insert().values(scope=scope, name=name, value=value))
            return
        except IntegrityError:
            continue


async def first(begin: Begin, scope: str, name: str, value: str) -> str:
    """The value kept under (scope, name), which is `value` if none was: the first writer wins, so
    replicas starting together agree (a gateway-wide generated secret, for one)."""
    try:
        async with begin() as conn:
            await conn.execute(preferences.insert().values(scope=scope, name=name, value=value))
        return value
    except IntegrityError:
        async with begin() as conn:
            found = await conn.scalar(sa.select(preferences.c.value)
                                      .where(preferences.c.scope == scope, preferences.c.name == name))
        return str(found)
