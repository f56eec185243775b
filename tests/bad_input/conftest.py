"""Bad requests change nothing, so one gateway and one fake upstream serve a whole module.

Starting and stopping a server per test would dominate the run time. `fake_openai` and the
gateway's artifacts are reset before each test; a test that makes the upstream misbehave starts
its own pair (`isolated`).
These `gateway` and `fake_openai` override the ones of tests/conftest.py in this folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import UPSTREAM_KEY, Gateway, StartGateway, base_config, serve_gateway
from tests.fakes.openai_upstream import FakeOpenAI


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, FakeOpenAI]]:
    tmp = tmp_path_factory.mktemp("bad-input")
    with FakeOpenAI(UPSTREAM_KEY) as fake, serve_gateway(base_config(tmp, fake.base_url)) as gw:
        yield gw, fake


@pytest.fixture
def fake_openai(shared: tuple[Gateway, FakeOpenAI]) -> FakeOpenAI:
    fake = shared[1]
    fake.requests.clear()
    fake.behave()
    return fake


@pytest.fixture
def gateway(shared: tuple[Gateway, FakeOpenAI], fake_openai: FakeOpenAI) -> Gateway:
    """The shared gateway, its artifacts (every answered image is one) cleared like the fake's requests."""
    gw = shared[0]
    for stored in gw.state.artifacts.dir.glob("art_*"):
        stored.unlink()
    return gw


@pytest.fixture
def isolated(tmp_path: Path, start_gateway: StartGateway) -> Iterator[tuple[Gateway, FakeOpenAI]]:
    """A gateway and upstream of its own, for a test that changes how the upstream behaves."""
    with FakeOpenAI(UPSTREAM_KEY) as fake:
        yield start_gateway(base_config(tmp_path, fake.base_url)), fake
