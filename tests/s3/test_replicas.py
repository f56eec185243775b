"""Two gateway processes on two "machines": they share a PostgreSQL database and one bucket, and
no directory. What one stores, the other serves."""

from __future__ import annotations

import base64
import contextlib
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

from tests.conftest import free_port, png_bytes, wait_until_healthy
from tests.s3.seaweed import Seaweed
from tests.state.conftest import pg_database

ROOT = Path(__file__).resolve().parents[2]


class Replica:
    def __init__(self, home: Path, cfg: dict[str, Any]) -> None:
        home.mkdir()
        path = home / "gateway.yaml"
        path.write_text(yaml.safe_dump({**cfg, "artifacts": {**cfg["artifacts"], "dir": str(home / "artifacts")}}))
        self.home, self.url = home, f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imagegate", "serve", "--config", str(path), "--port", self.url.rsplit(":", 1)[1],
             "--log-level", "warning"],
            cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"})
        wait_until_healthy(self.proc, self.url, lambda: self.proc.stdout.read().decode() if self.proc.stdout else "")
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def stop(self) -> None:
        self.http.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture
def replicas(tmp_path: Path, seaweed: Seaweed, prefix: str) -> Iterator[tuple[Replica, Replica]]:
    with pg_database() as state_url:
        models = {"demo": {"price_per_mp": 0.0015, "routes": [{"provider": "demo", "model": "demo"}],
                           "limits": {"min_side": 64, "max_side": 1024, "multiple_of": 16, "max_n": 4}}}
        cfg = {"state": {"url": state_url}, "artifacts": seaweed.s3_config(prefix),
               "providers": {"demo": {"type": "demo"}}, "models": models}
        first = Replica(tmp_path / "machine-a", cfg)
        try:
            second = Replica(tmp_path / "machine-b", cfg)
        except BaseException:
            first.stop()
            raise
        yield first, second
        first.stop()
        second.stop()


def finished(replica: Replica, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while (task := replica.http.get(f"/v1/tasks/{task_id}").json()).get("status") in ("queued", "running"):
        assert time.monotonic() < deadline, task
        time.sleep(0.1)
    return dict(task)


def test_a_task_made_on_one_replica_is_served_by_the_other(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    for response_format in ("url", "b64_json"):
        task = a.http.post("/v1/images/generations", json={"model": "demo", "prompt": "p", "size": "64x64",
                                                            "async": True, "response_format": response_format})
        assert task.status_code == 202, task.text
        seen = finished(b, task.json()["id"])
        assert seen["status"] == "succeeded", seen
        item = seen["result"]["data"][0]
        content = b.http.get(f"/v1/artifacts/{item['artifact_id']}/content")  # auth off: any caller
        assert content.status_code == 200 and content.headers["content-type"] == "image/png"
        if response_format == "url":
            assert httpx.get(item["url"]).content == content.content  # presigned: from the bucket itself
        else:
            assert base64.b64decode(item["b64_json"]) == content.content
    assert not list((a.home / "artifacts").glob("art_*")) and not list((b.home / "artifacts").glob("art_*"))


def test_an_upload_on_one_replica_is_an_edit_input_on_the_other(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    upload = a.http.post("/v1/uploads", files={"file": ("in.png", png_bytes(64, 64, (200, 10, 10)), "image/png")})
    assert upload.status_code == 200, upload.text
    art = upload.json()["id"]
    edited = b.http.post("/v1/images/image-to-image", json={"model": "demo", "prompt": "p", "image": art,
                                                             "async": False})
    assert edited.status_code == 200, edited.text
    assert edited.json()["inputs"] == [{"artifact_id": art}]


def test_gateway_signed_urls_from_one_replica_verify_on_the_other(tmp_path: Path, seaweed: Seaweed,
                                                                  prefix: str) -> None:
    # No signing secret is configured: the replicas agree on one kept in the shared state store.
    with pg_database() as state_url:
        cfg = {"state": {"url": state_url}, "artifacts": seaweed.s3_config(prefix, url_results="gateway"),
               "providers": {"demo": {"type": "demo"}},
               "models": {"demo": {"price_per_mp": 0, "routes": [{"provider": "demo", "model": "demo"}]}}}
        a = Replica(tmp_path / "a", cfg)
        try:
            b = Replica(tmp_path / "b", cfg)
            try:
                made = a.http.post("/v1/images/generations", json={"model": "demo", "prompt": "p", "size": "64x64",
                                                                    "response_format": "url"}).json()
                url = made["data"][0]["url"]
                assert url.startswith(a.url)
                fetched = httpx.get(b.url + url.removeprefix(a.url))
                assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
            finally:
                b.stop()
        finally:
            a.stop()
