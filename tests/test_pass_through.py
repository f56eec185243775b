"""The hot path: an upstream's base64 passes through to the client byte for byte when it is
already what was asked (no decode into a str, no re-encode), in every shape an OpenAI-compatible
upstream writes it, and a gateway told not to keep b64_json answers writes no artifact."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from imagegate.providers.http import parse_images_answer
from imagegate.router.artifacts.local import THROUGH_FROM_BYTES, write_through
from imagegate.router.pipeline.json_parts import Base64Text, json_bytes, json_parts
from tests.conftest import Gateway, StartGateway, base_config
from tests.fakes.openai_upstream import FakeOpenAI, noise_png

SIZE = 1024


@pytest.fixture
def noisy(fake_openai: FakeOpenAI) -> FakeOpenAI:
    fake_openai.noise = True  # a real photo-sized PNG: 3 MB of base64 at 1024x1024
    return fake_openai


def _generate(gw: Gateway, n: int = 1, **extra: Any) -> httpx.Response:
    resp = gw.http.post("/v1/images/generations", json={"model": "remote", "prompt": "p", "size": f"{SIZE}x{SIZE}",
                                                         "n": n, **extra})
    assert resp.status_code == 200, resp.text
    return resp


@pytest.mark.parametrize("mode", ["b64", "escaped", "data_uri"])
def test_the_answer_carries_the_upstreams_base64_byte_for_byte(gateway: Gateway, noisy: FakeOpenAI, mode: str) -> None:
    noisy.behave(mode=mode)
    resp = _generate(gateway, n=3)
    upstream_b64 = base64.b64encode(noise_png(SIZE, SIZE)).decode()
    data = resp.json()["data"]
    assert [item["b64_json"] for item in data] == [upstream_b64] * 3
    assert all(item["artifact_id"].startswith("art_") for item in data)
    # The body is exactly one JSON document, as long as it says.
    assert int(resp.headers["content-length"]) == len(resp.content)


def test_a_replayed_answer_is_the_same_bytes(gateway: Gateway, noisy: FakeOpenAI) -> None:
    body = {"model": "remote", "prompt": "p", "size": f"{SIZE}x{SIZE}", "n": 2}
    first = gateway.http.post("/v1/images/generations", json=body, headers={"idempotency-key": "same"})
    again = gateway.http.post("/v1/images/generations", json=body, headers={"idempotency-key": "same"})
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotency-replayed"] == "true"
    assert again.content == first.content
    assert len(noisy.requests) == 1


def test_the_sdk_reads_the_passed_through_image(gateway: Gateway, noisy: FakeOpenAI) -> None:
    result = gateway.client.images.generate(model="remote", prompt="p", size="1024x1024")
    assert result.data and base64.b64decode(result.data[0].b64_json or "") == noise_png(SIZE, SIZE)


def test_b64_answers_keep_no_artifact_when_configured_so(tmp_path: Path, noisy: FakeOpenAI,
                                                         start_gateway: StartGateway) -> None:
    cfg = base_config(tmp_path, noisy.base_url)
    cfg["artifacts"]["keep_b64_answers"] = False
    gw = start_gateway(cfg)
    item = _generate(gw, n=2).json()["data"][0]
    assert "artifact_id" not in item and item["b64_json"] == base64.b64encode(noise_png(SIZE, SIZE)).decode()
    assert not list((tmp_path / "artifacts").glob("art_*"))
    # URLs are artifacts by nature: still kept.
    url_item = _generate(gw, response_format="url").json()["data"][0]
    assert url_item["artifact_id"].startswith("art_") and list((tmp_path / "artifacts").glob("art_*.bin"))
    assert gw.http.get(url_item["url"]).content == noise_png(SIZE, SIZE)


def test_an_images_answer_is_cut_around_its_base64() -> None:
    answer = {"created": 1, "data": [{"b64_json": "QUJD", "revised_prompt": 'say "b64_json": "no"'},
                                     {"url": "https://x/y"}, {"b64_json": "REVG"}]}
    parsed, views = parse_images_answer(bytearray(orjson.dumps(answer)))
    assert [bytes(v) for v in views] == [b"QUJD", b"REVG"]
    assert parsed["data"][0] == {"b64_json": "", "revised_prompt": 'say "b64_json": "no"'}
    assert parsed["data"][1:] == [{"url": "https://x/y"}, {"b64_json": ""}]
    # An escape inside a value: the whole answer is parsed instead, nothing is cut.
    escaped = bytearray(orjson.dumps(answer).replace(b"QUJD", b"QU\\/D"))
    parsed, views = parse_images_answer(escaped)
    assert views == [] and parsed["data"][0]["b64_json"] == "QU/D"


def test_json_parts_write_base64_between_the_pieces_unchanged() -> None:
    content = {"data": [{"b64_json": Base64Text(b"QUJD"), "seed": 1}, {"b64_json": Base64Text(memoryview(b"RA=="))}],
               "note": "Base64Text is not a marker"}
    pieces = json_parts(content)
    assert any(isinstance(piece, memoryview) and bytes(piece) == b"RA==" for piece in pieces)
    assert orjson.loads(json_bytes(content)) == {"data": [{"b64_json": "QUJD", "seed": 1}, {"b64_json": "RA=="}],
                                                 "note": "Base64Text is not a marker"}
    assert json_parts({"a": 1}) == [b'{"a":1}']


def test_the_kept_artifact_is_the_upstreams_image_on_disk(tmp_path: Path, gateway: Gateway, noisy: FakeOpenAI) -> None:
    # Artifacts are written through the page cache (local.write_through): the file must still hold
    # the exact bytes, and the artifact's URL must serve them.
    item = _generate(gateway, n=1).json()["data"][0]
    blob = tmp_path / "artifacts" / f"{item['artifact_id']}.bin"
    assert blob.read_bytes() == noise_png(SIZE, SIZE)
    url = gateway.http.post("/v1/images/generations", json={"model": "remote", "prompt": "p", "size": f"{SIZE}x{SIZE}",
                                                            "response_format": "url"}).json()["data"][0]["url"]
    assert gateway.http.get(url).content == noise_png(SIZE, SIZE)


@pytest.mark.parametrize("size", [3, THROUGH_FROM_BYTES])  # written plainly; synced and dropped from the cache
def test_write_through_leaves_the_bytes_and_replaces_a_file(tmp_path: Path, size: int) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"older and longer contents" * 20_000)
    data = bytes(range(256)) * (size // 256) + b"new"[: size % 256]
    write_through(path, data)
    assert path.read_bytes() == data
