"""Session fixtures for the local backend: tiny random pipelines of every family, saved to a temporary
directory once per session and loaded back through the backend's own loading code; one shared worker.

Without torch/diffusers installed (the `local` extra) these tests are not collected."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import pytest

if importlib.util.find_spec("torch") is None or importlib.util.find_spec("diffusers") is None:
    collect_ignore_glob = ["test_*.py"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.local.support import TinyModels

    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def registry() -> Any:
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


@pytest.fixture(scope="session")
def worker(registry: Any) -> Iterator[Any]:
    """The shared CPU worker (no memory budget). Tests that evict, fail or fill a worker make their own."""
    from imagegate.local_backend.metrics import BackendMetrics
    from imagegate.local_backend.worker import DeviceWorker

    w = DeviceWorker("cpu", memory_budget_gb=None, max_queue=16, max_batch=4, metrics=BackendMetrics(registry))
    asyncio.run(w.start())
    yield w
    asyncio.run(w.aclose())
