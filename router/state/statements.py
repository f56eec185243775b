"""The credit path's statements, run in as few driver calls as the database allows.

On PostgreSQL (asyncpg) a statement is one round trip either way and runs through SQLAlchemy as
usual. On SQLite, SQLAlchemy's aiosqlite adapter makes three hops to aiosqlite's connection
thread per statement (cursor, execute, close); each hop wakes a thread and hands the GIL over,
which cost more than the statement itself (120 context switches per metered request, README
Performance). Here a statement, compiled once per shape, is one hop: aiosqlite's own `execute`
on the same connection, inside the same transaction (sqlite3 begins it on the first write).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert, UpdateBase

_COMPILED: dict[tuple[int, tuple[str, ...]], Any] = {}  # (statement, its parameters' names) → compiled


def _one_hop(conn: AsyncConnection) -> bool:
    # A schema translate map (tests, shared databases) is applied by SQLAlchemy's execution only.
    options = conn.engine.sync_engine.get_execution_options()
    return conn.dialect.name == "sqlite" and not options.get("schema_translate_map")


def _compiled(conn: AsyncConnection, statement: UpdateBase, names: list[str]) -> Any:
    """`statement` compiled for SQLite with these parameters, once. `statement` must live as long as
    the process (a module constant): it is cached by identity."""
    key = (id(statement), tuple(sorted(names)))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = statement.compile(dialect=conn.dialect, column_keys=list(key[1]))
    return compiled


def _args(compiled: Any, params: dict[str, Any]) -> tuple[Any, ...]:
    values = compiled.construct_params(params)
    return tuple(values[name] for name in compiled.positiontup or ())


async def _driver(conn: AsyncConnection) -> Any:
    """The aiosqlite connection under `conn` (its transaction is the same)."""
    return (await conn.get_raw_connection()).driver_connection


async def write(conn: AsyncConnection, statement: UpdateBase, params: dict[str, Any]) -> int:
    """Run an INSERT, UPDATE or DELETE; the rows it changed."""
    if not _one_hop(conn):
        return int((await conn.execute(statement, params)).rowcount)
    compiled = _compiled(conn, statement, list(params))
    return int((await (await _driver(conn)).execute(str(compiled), _args(compiled, params))).rowcount)


async def write_returning(conn: AsyncConnection, statement: UpdateBase,
                          params: dict[str, Any]) -> Sequence[Any] | None:
    """Run an UPDATE … RETURNING; its first row (columns in RETURNING's order), or None."""
    if not _one_hop(conn):
        return (await conn.execute(statement, params)).first()
    compiled = _compiled(conn, statement, list(params))
    return next(iter(await (await _driver(conn)).execute_fetchall(str(compiled), _args(compiled, params))), None)


async def insert_many(conn: AsyncConnection, statement: Insert, rows: list[dict[str, Any]]) -> None:
    """Insert rows with the same columns: one statement on PostgreSQL, one driver call on SQLite."""
    if not _one_hop(conn):
        await conn.execute(statement, rows)
        return
    compiled = _compiled(conn, statement, list(rows[0]))
    await (await _driver(conn)).executemany(str(compiled), [_args(compiled, row) for row in rows])
