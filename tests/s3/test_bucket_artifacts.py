"""Artifacts in a real S3 server (SeaweedFS on 127.0.0.1): url results and task results as
presigned URLs that expire, gateway-signed URLs streamed from the bucket, content-addressed
inputs, the sweep, and a bucket that refuses our credentials."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from PIL import Image

from imagegate.router.artifacts.s3 import S3Artifacts
from imagegate.router.config import ArtifactsConfig
from tests.conftest import StartGateway, base_config, decode, png_bytes, sdk
from tests.s3.seaweed import ACCESS_KEY, BUCKET, SECRET_KEY, Seaweed


def bucket_config(tmp_path: Path, seaweed: Seaweed, prefix: str, **artifacts: Any) -> dict[str, Any]:
    cfg = base_config(tmp_path)
    cfg["artifacts"] = seaweed.s3_config(prefix, **artifacts)
    return cfg


def wait_for(condition: Any, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_url_results_are_presigned_bucket_urls_that_expire(tmp_path: Path, seaweed: Seaweed, prefix: str,
                                                            start_gateway: StartGateway) -> None:
    gw = start_gateway(bucket_config(tmp_path, seaweed, prefix, ttl_hours=0.001))  # 3.6 s
    result = sdk(gw).images.generate(model="demo", prompt="p", size="128x128", n=2, response_format="url")
    urls = [d.url or "" for d in result.data or []]
    assert len(urls) == 2 and all(u.startswith(f"{seaweed.endpoint}/{BUCKET}/{prefix}/art_") for u in urls)
    assert all("X-Amz-Signature=" in u and SECRET_KEY not in u for u in urls)
    fetched = httpx.get(urls[0])
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (128, 128)
    assert httpx.get(urls[0].split("?")[0]).status_code == 403  # the bucket is not public
    assert len(seaweed.keys(prefix)) == 2 and not list((tmp_path / "artifacts").glob("art_*"))
    wait_for(lambda: httpx.get(urls[1]).status_code == 403, "the presigned URL to expire")


def test_task_results_download_from_the_bucket(tmp_path: Path, seaweed: Seaweed, prefix: str,
                                               start_gateway: StartGateway) -> None:
    gw = start_gateway(bucket_config(tmp_path, seaweed, prefix))
    task = gw.http.post("/v1/images/generations", json={"model": "demo", "prompt": "p", "size": "64x64",
                                                         "async": True, "response_format": "url"}).json()
    wait_for(lambda: gw.http.get(f"/v1/tasks/{task['id']}").json()["status"] == "succeeded", "the task")
    item = gw.http.get(f"/v1/tasks/{task['id']}").json()["result"]["data"][0]
    assert item["url"].startswith(seaweed.endpoint) and httpx.get(item["url"]).status_code == 200
    b64 = gw.http.post("/v1/images/generations", json={"model": "demo", "prompt": "p", "size": "64x64",
                                                        "async": True}).json()
    wait_for(lambda: gw.http.get(f"/v1/tasks/{b64['id']}").json()["status"] == "succeeded", "the b64 task")
    data = gw.http.get(f"/v1/tasks/{b64['id']}").json()["result"]["data"][0]  # bytes read back from the bucket
    assert decode(data["b64_json"]).size == (64, 64)


def test_gateway_urls_stream_the_bytes_from_the_bucket(tmp_path: Path, seaweed: Seaweed, prefix: str,
                                                      start_gateway: StartGateway) -> None:
    gw = start_gateway(bucket_config(tmp_path, seaweed, prefix, url_results="gateway"))
    url = sdk(gw).images.generate(model="demo", prompt="p", size="64x64", response_format="url").data[0].url or ""
    assert url.startswith(f"{gw.url}/v1/artifacts/art_") and "signature=" in url
    answer = httpx.get(url)
    assert answer.status_code == 200 and Image.open(io.BytesIO(answer.content)).size == (64, 64)
    tampered = url.replace("signature=", "signature=0")
    assert httpx.get(tampered).status_code == 403


def test_the_same_input_twice_is_one_object(tmp_path: Path, seaweed: Seaweed, prefix: str,
                                            start_gateway: StartGateway) -> None:
    cfg = bucket_config(tmp_path, seaweed, prefix)
    cfg["models"]["demo"]["capabilities"] = ["generate", "edit"]
    gw = start_gateway(cfg)
    body = {"model": "demo", "prompt": "p", "image": "data:image/png;base64,"
            + base64.b64encode(png_bytes(64, 64, (9, 9, 9))).decode()}
    for _ in range(2):
        answer = gw.http.post("/v1/images/image-to-image", json={**body, "async": False})
        assert answer.status_code == 200, answer.text
    inputs = {answer.json()["inputs"][0]["artifact_id"]}
    stored = {key.rsplit("/", 1)[-1] for key in seaweed.keys(prefix)}
    assert inputs <= stored and len(stored) == 3  # one input, two results


def test_the_sweep_deletes_expired_objects(seaweed: Seaweed, prefix: str) -> None:
    cfg = ArtifactsConfig.model_validate(seaweed.s3_config(prefix, ttl_hours=0.0003))  # about a second

    async def run() -> tuple[int, str]:
        store = S3Artifacts(cfg, b"secret")
        kept = await store.put(b"x" * 10, content_type="image/png", width=1, height=1, ttl_s=3600)
        await store.put(b"y" * 10, content_type="image/png", width=1, height=1)
        await asyncio.sleep(2)  # past the second one's expiry (whole seconds)
        removed = await store.sweep()
        assert (await store.get(kept.id)) is not None
        return removed, kept.id

    removed, kept = asyncio.run(run())
    assert removed == 1 and seaweed.keys(prefix) == [f"{prefix}/{kept}"]


def test_a_bucket_that_refuses_our_credentials_fails_readyz_and_the_probe(
        tmp_path: Path, seaweed: Seaweed, prefix: str, start_gateway: StartGateway,
        caplog: pytest.LogCaptureFixture) -> None:
    wrong = "not-the-secret-8812"
    cfg = bucket_config(tmp_path, seaweed, prefix)
    cfg["artifacts"]["s3"]["secret_access_key"] = wrong
    gw = start_gateway(cfg)
    ready = gw.http.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["artifacts"] is False
    problem = ready.json()["problems"]["artifacts"]
    assert "refused the configured credentials" in problem and wrong not in ready.text and ACCESS_KEY not in problem
    failed = gw.http.post("/v1/images/generations", json={"model": "demo", "prompt": "p", "size": "64x64",
                                                           "response_format": "url"})
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "artifact_storage_unavailable"
    assert wrong not in failed.text and wrong not in caplog.text and "refused" in caplog.text
    path = tmp_path / "wrong.yaml"
    path.write_text(yaml.safe_dump(cfg))
    probe = subprocess.run([sys.executable, "-m", "imagegate", "check-config", "--probe", str(path)],
                           capture_output=True, text=True, check=False)
    assert probe.returncode == 1 and "refused the configured credentials" in probe.stderr
    assert wrong not in probe.stderr + probe.stdout
    cfg["artifacts"]["s3"]["secret_access_key"] = SECRET_KEY
    path.write_text(yaml.safe_dump(cfg))
    good = subprocess.run([sys.executable, "-m", "imagegate", "check-config", "--probe", str(path)],
                          capture_output=True, text=True, check=False)
    assert good.returncode == 0 and "artifact store answer" in good.stdout, good.stderr
    assert urlsplit(seaweed.endpoint).hostname == "127.0.0.1"


@pytest.mark.parametrize("url", ["s3://", "s3://UPPER/x", "https://bucket/x"])
def test_a_malformed_bucket_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ValueError, match="s3://bucket"):
        ArtifactsConfig.model_validate({"url": url})


def test_tenancy_holds_in_the_bucket(tmp_path: Path, seaweed: Seaweed, prefix: str,
                                     start_gateway: StartGateway) -> None:
    cfg = bucket_config(tmp_path, seaweed, prefix)
    cfg["auth"] = {"enabled": True, "admin_key": "adm"}
    gw = start_gateway(cfg)

    def key() -> dict[str, str]:
        made = gw.http.post("/admin/keys", json={"name": "k"}, headers={"authorization": "Bearer adm"}).json()
        return {"authorization": f"Bearer {made['key']}"}

    owner, stranger = key(), key()
    art = gw.http.post("/v1/uploads", files={"file": ("a.png", png_bytes(64, 64), "image/png")}, headers=owner)
    assert art.status_code == 200, art.text
    path = f"/v1/artifacts/{art.json()['id']}/content"
    assert gw.http.get(path, headers=owner).content == png_bytes(64, 64)
    assert gw.http.get(path, headers=stranger).status_code == 404
    assert gw.http.get(path).status_code == 401
