"""One SeaweedFS for the session (it starts in about two seconds); each test keeps its artifacts
under a prefix of its own."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.s3.seaweed import Seaweed, start_seaweed


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"t-{secrets.token_hex(6)}"
