"""The webhook outbox across processes: a gateway killed with SIGKILL between attempts delivers
after its restart, and two replicas on one PostgreSQL deliver each event once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from standardwebhooks.webhooks import Webhook

from tests.conftest import Gateway, base_config, free_port, serve_gateway, wait_until_healthy
from tests.fakes.webhook_receiver import Answer, WebhookReceiver
from tests.state.conftest import pg_database
from tests.test_webhooks import ADMIN, FAST, delivered, make_key, submit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as fake:
        yield fake


class Process:
    """`imagegate serve` on a port of its own; `kill()` is SIGKILL: nothing is drained or flushed."""

    def __init__(self, path: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imagegate", "serve", "--config", str(path), "--port", self.url.rsplit(":", 1)[1],
             "--log-level", "warning"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"})
        wait_until_healthy(self.proc, self.url, lambda: self.proc.stdout.read().decode() if self.proc.stdout else "")
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def kill(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()


def test_a_gateway_killed_between_attempts_delivers_after_restart(tmp_path: Path,
                                                                  receiver: WebhookReceiver) -> None:
    cfg: dict[str, Any] = base_config(tmp_path)
    cfg["auth"] = {"enabled": True, "admin_key": ADMIN}
    cfg["webhooks"] = {**FAST, "backoff_s": [2]}  # the second attempt 2 s after the first
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    receiver.answer("k", Answer(500))
    first = Process(path)
    try:
        _, key, secret = make_key(first)
        task_id = submit(first, key, receiver.hook("k")).json()["id"]
        receiver.wait("k", 1)
        deadline = time.monotonic() + 10
        while first.http.get(f"/v1/tasks/{task_id}", headers={"authorization": f"Bearer {key}"}
                             ).json()["webhook"]["attempts"] != 1:  # the failed attempt is on record
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        first.kill()
    second = Process(path)
    try:
        one, two = receiver.wait("k", 2)
        assert one.headers["webhook-id"] == two.headers["webhook-id"]
        assert Webhook(secret).verify(two.body, two.headers)["data"]["id"] == task_id
        view = delivered(second, key, task_id)["webhook"]
        assert view["attempts"] == 2 and view["status"] == "delivered"
    finally:
        second.kill()


def test_two_replicas_deliver_each_event_once(tmp_path: Path, receiver: WebhookReceiver) -> None:
    receiver.delay_s = 0.2  # a slow receiver: a double claim would have time to show
    with pg_database() as state_url:
        replicas: list[Gateway] = []
        try:
            for _ in range(2):  # one database, one artifacts volume
                cfg = base_config(tmp_path)
                cfg.update(state={"url": state_url}, auth={"enabled": True, "admin_key": ADMIN}, webhooks=FAST)
                replicas.append(serve_gateway(cfg))
            _, key, _ = make_key(replicas[0])
            tasks = [submit(replicas[i % 2], key, receiver.hook("once")).json()["id"] for i in range(6)]
            for i, task_id in enumerate(tasks):
                delivered(replicas[(i + 1) % 2], key, task_id)  # seen from the other replica too
            got = receiver.at("once")
            assert len(got) == 6 and len({r.headers["webhook-id"] for r in got}) == 6
        finally:
            for gw in replicas:
                gw.close()
