"""The store under test: SQLite always, PostgreSQL (a fresh schema per test) when 127.0.0.1:5432 answers."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

PG_URL = os.environ.get("IMAGEGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Backend:
    url: str
    schema: str | None  # PostgreSQL: a schema of this test's own, dropped after it


async def _schema(action: sa.schema.ExecutableDDLElement) -> None:
    engine = create_async_engine(PG_URL.replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        async with engine.begin() as conn:
            await conn.execute(action)
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend(f"sqlite:///{tmp_path / 'state.db'}", None)
        return
    if not _pg_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (set IMAGEGATE_TEST_PG to point elsewhere)")
    name = f"ig_test_{secrets.token_hex(6)}"
    asyncio.run(_schema(sa.schema.CreateSchema(name)))
    try:
        yield Backend(PG_URL, name)
    finally:
        asyncio.run(_schema(sa.schema.DropSchema(name, cascade=True)))


async def _pg_ddl(sql: str) -> None:
    engine = create_async_engine(PG_URL.replace("postgresql://", "postgresql+asyncpg://", 1),
                                 isolation_level="AUTOCOMMIT")  # CREATE DATABASE cannot run in a transaction
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text(sql))
    finally:
        await engine.dispose()


@contextmanager
def pg_database() -> Iterator[str]:
    """The `state.url` of a fresh PostgreSQL database of the caller's own (a live gateway, or several
    replicas, on it), dropped afterwards; skips when PostgreSQL is unreachable."""
    if not _pg_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (set IMAGEGATE_TEST_PG to point elsewhere)")
    name = f"ig_test_{secrets.token_hex(6)}"
    asyncio.run(_pg_ddl(f"CREATE DATABASE {name}"))
    try:
        yield PG_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(_pg_ddl(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
