"""How the store runs a transaction. The statements (keys.py, holds.py, tasks.py, …) are plain
synchronous functions over a SQLAlchemy Connection; a runner runs one such function as one
transaction (`write`) or on one connection without one (`read`), and awaits it.

- SQLite (`ThreadRunner`, pysqlite): the whole function runs on a worker thread. A transaction
  is then one hand-over from the event loop to a thread and one back, whatever its statements.
  Through aiosqlite every statement was one hand-over or more (three through SQLAlchemy's
  adapter), and each one wakes a thread and passes the GIL, which cost more than the statement
  (README, Performance).
- PostgreSQL (`AsyncRunner`, asyncpg): the function runs under `AsyncConnection.run_sync`, each
  statement one awaited round trip, as it would be in async code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine

P = ParamSpec("P")
T = TypeVar("T")

# Reads of one gateway at once on SQLite (WAL: they never wait for the writer). Writes queue on
# one lock anyway, so a thread more serves a read beside the write being made.
SQLITE_THREADS = 4


class Runner(Protocol):
    """What the store needs of a database: the two ways to run a statement function."""

    async def write(self, work: Callable[Concatenate[Connection, P], T], /,
                    *args: P.args, **kwargs: P.kwargs) -> T: ...

    async def read(self, work: Callable[Concatenate[Connection, P], T], /,
                   *args: P.args, **kwargs: P.kwargs) -> T: ...

    async def close(self) -> None: ...


class ThreadRunner:
    """SQLite: every transaction on a worker thread, the writes one at a time per process.

    SQLite takes one writer at a time and makes the others sleep and retry (its busy handler, up
    to 100 ms a try): 32 requests of one gateway contending that way had a p99 of half a second.
    Queued on the lock here instead, in order, they wait only for each other (README,
    Performance). Other processes on the file still meet the busy handler."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._one_writer = asyncio.Lock()
        self._threads = ThreadPoolExecutor(SQLITE_THREADS, thread_name_prefix="imagegate-sqlite")

    async def write(self, work: Callable[Concatenate[Connection, P], T], /,
                    *args: P.args, **kwargs: P.kwargs) -> T:
        async with self._one_writer:  # a cancelled caller frees it early: SQLite's own lock still holds
            return await self._on_thread(self._transaction, lambda conn: work(conn, *args, **kwargs))

    async def read(self, work: Callable[Concatenate[Connection, P], T], /,
                   *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._on_thread(self._connection, lambda conn: work(conn, *args, **kwargs))

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._threads.shutdown)
        self.engine.dispose()

    async def _on_thread(self, how: Callable[[Callable[[Connection], T]], T], work: Callable[[Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, how, work)

    def _transaction(self, work: Callable[[Connection], T]) -> T:
        with self.engine.begin() as conn:
            return work(conn)

    def _connection(self, work: Callable[[Connection], T]) -> T:
        with self.engine.connect() as conn:
            return work(conn)


class AsyncRunner:
    """PostgreSQL: `write` in a READ COMMITTED transaction, `read` and `single` on a connection
    idling in autocommit, where one statement is one round trip and commits itself (pg_credit.py)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine  # autocommit (store._engine)
        self._transactions = engine.execution_options(isolation_level="READ COMMITTED")

    async def write(self, work: Callable[Concatenate[Connection, P], T], /,
                    *args: P.args, **kwargs: P.kwargs) -> T:
        async with self._transactions.begin() as conn:
            return await conn.run_sync(work, *args, **kwargs)

    async def read(self, work: Callable[Concatenate[Connection, P], T], /,
                   *args: P.args, **kwargs: P.kwargs) -> T:
        async with self._transactions.connect() as conn:
            return await conn.run_sync(work, *args, **kwargs)

    async def single(self, work: Callable[Concatenate[Connection, P], T], /,
                     *args: P.args, **kwargs: P.kwargs) -> T:
        async with self.engine.connect() as conn:
            return await conn.run_sync(work, *args, **kwargs)

    async def close(self) -> None:
        await self.engine.dispose()  # and with it the pool `_transactions` shares
