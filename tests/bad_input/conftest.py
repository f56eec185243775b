"""Bad requests change nothing, so one gateway and one fake upstream serve a whole module.

Starting and stopping a server per test would dominate the run time. `fake_openai` is reset
before each test; a test that makes the upstream misbehave starts its own pair (`isolated`).
These `gateway` and `fake_openai` override the ones of tests/conftest.py in this folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.app import create_app
from router.config import load_text
from tests.conftest import UPSTREAM_KEY, Gateway, base_config
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.server import ServerThread


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, FakeOpenAI]]:
    fake = FakeOpenAI(UPSTREAM_KEY).start()
    cfg = base_config(tmp_path_factory.mktemp("bad-input"), fake.base_url)
    app = create_app(load_text(yaml.safe_dump(cfg)))
    gw = Gateway(ServerThread(app).start(), app)
    yield gw, fake
    gw.close()
    fake.stop()


@pytest.fixture
def fake_openai(shared: tuple[Gateway, FakeOpenAI]) -> FakeOpenAI:
    fake = shared[1]
    fake.requests.clear()
    fake.behave()
    return fake


@pytest.fixture
def gateway(shared: tuple[Gateway, FakeOpenAI], fake_openai: FakeOpenAI) -> Gateway:
    return shared[0]


@pytest.fixture
def isolated(tmp_path: Path,
             start_gateway: Callable[[dict[str, Any]], Gateway]) -> Iterator[tuple[Gateway, FakeOpenAI]]:
    """A gateway and upstream of its own, for a test that changes how the upstream behaves."""
    fake = FakeOpenAI(UPSTREAM_KEY).start()
    yield start_gateway(base_config(tmp_path, fake.base_url)), fake
    fake.stop()
