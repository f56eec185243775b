"""Helpers for tests/state/test_tasks.py: submitting and polling async tasks, keys and usage over
plain HTTP, a fresh PostgreSQL DATABASE per test, and `imagegate serve` as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml

from imagegate.router.state import open_store
from tests.conftest import free_port, wait_until_healthy

ADMIN = "admin-secret-for-tests"
TERMINAL = ("succeeded", "failed", "canceled")
ROOT = Path(__file__).resolve().parent.parent.parent


def bearer(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def make_key(http: httpx.Client, credits: str | None) -> str:
    fields = {"name": "t", **({"credits": credits} if credits is not None else {})}
    made = http.post("/admin/keys", json=fields, headers=bearer(ADMIN))
    assert made.status_code == 201, made.text
    return str(made.json()["key"])


def usage(http: httpx.Client, key: str) -> dict[str, Any]:
    answer = http.get("/v1/usage", headers=bearer(key))
    assert answer.status_code == 200, answer.text
    seen = dict(answer.json())
    assert sum(e["amount_micros"] for e in seen["ledger"]) == seen["balance_micros"], seen
    return seen


def submit(http: httpx.Client, key: str | None, *, prefer: bool = False, **body: Any) -> httpx.Response:
    """POST a generation; `"async": true` in the body unless `prefer` (then the Prefer header)."""
    payload = {"prompt": "a red cube", **body}
    headers = bearer(key)
    if prefer:
        headers["prefer"] = "respond-async"
    else:
        payload["async"] = True
    return http.post("/v1/images/generations", json=payload, headers=headers)


def accepted(answer: httpx.Response) -> dict[str, Any]:
    """Check a 202 task answer (status, Location, task shape) and return the task."""
    assert answer.status_code == 202, answer.text
    task = dict(answer.json())
    assert task["id"].startswith("task_") and task["object"] == "image.task", task
    assert answer.headers["location"] == f"/v1/tasks/{task['id']}"
    assert task["status"] in ("queued", "running", "succeeded"), task
    assert isinstance(task["created_at"], int) and isinstance(task["expires_at"], int)
    assert task["expires_at"] > task["created_at"]
    assert 0.0 <= task["progress"] <= 1.0
    return task


def get_task(http: httpx.Client, key: str | None, task_id: str) -> httpx.Response:
    return http.get(f"/v1/tasks/{task_id}", headers=bearer(key))


def poll(http: httpx.Client, key: str | None, task_id: str, until: Callable[[dict[str, Any]], bool] | None = None,
         *, timeout: float = 40, seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """GET the task until `until(task)` (default: a terminal status); fail at the deadline."""
    done = until or (lambda t: t["status"] in TERMINAL)
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        answer = get_task(http, key, task_id)
        assert answer.status_code == 200, answer.text
        last = answer.json()
        if seen is not None:
            seen.append(last)
        if done(last):
            return dict(last)
        time.sleep(0.05)
    pytest.fail(f"task {task_id} did not get there within {timeout} s; last seen: {last}")


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` carrying all `labels` (0 when there is none)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


# -- the state store, read directly --------------------------------------------------------------

def held_holds(url: str) -> int:
    """How many rows of `holds` still have status `held`."""
    async def count() -> int:
        store = await open_store(url)
        try:
            return await store.runner.read(
                lambda conn: int(conn.execute(sa.text("SELECT count(*) FROM holds WHERE status = 'held'")).scalar()))
        finally:
            await store.close()
    return asyncio.run(count())


# -- `imagegate serve` as a real process ---------------------------------------------------------

class ServeProcess:
    """`python -m imagegate serve` on `cfg` (written to a file), in a session of its own; its log to a file."""

    def __init__(self, tmp_path: Path, cfg: dict[str, Any], name: str) -> None:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp_path / f"{name}.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imagegate", "serve", "--config", str(path), "--port", str(self.port),
                 "--log-level", "warning"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.http = httpx.Client(base_url=self.url, timeout=30)
        wait_until_healthy(self.proc, self.url, self.log, timeout=90)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL, the whole process group: no shutdown code runs."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self.kill()
