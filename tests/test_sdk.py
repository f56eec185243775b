"""The official openai SDK against a live gateway on 127.0.0.1."""

from __future__ import annotations

import io
import json

import anyio
import pytest
from PIL import Image

from tests.conftest import Gateway, b64, decode, png_bytes
from tests.fakes.openai_upstream import FakeOpenAI


def test_generate_returns_real_images_with_seeds_and_billing(gateway: Gateway) -> None:
    resp = gateway.client.images.generate(model="demo", prompt="a red fox", size="512x256", n=2,
                                          extra_body={"seed": 41})
    assert [d.seed for d in resp.data] == [41, 42]  # type: ignore[attr-defined]
    for item in resp.data:
        img = decode(item.b64_json)
        assert (img.format, img.size) == ("PNG", (512, 256))
    assert resp.size == "512x256" and resp.output_format == "png"
    extra = resp.model_extra or {}
    assert extra["model"] == "demo"
    # 512*256*2 / 1e6 = 0.262144 MP at $0.0015 = $0.000393216 -> 393 micro-dollars
    assert extra["billing"] == {"megapixels": 0.262144, "price_per_mp": 0.0015, "cost": 0.000393}


def test_same_seed_same_pixels_and_missing_seed_is_reported(gateway: Gateway) -> None:
    a = gateway.client.images.generate(model="demo", prompt="p", size="128x128", extra_body={"seed": 5})
    b = gateway.client.images.generate(model="demo", prompt="p", size="128x128", extra_body={"seed": 5})
    assert a.data[0].b64_json == b.data[0].b64_json
    c = gateway.client.images.generate(model="demo", prompt="p", size="128x128")
    seed = c.data[0].seed  # type: ignore[attr-defined]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    again = gateway.client.images.generate(model="demo", prompt="p", size="128x128", extra_body={"seed": seed})
    assert again.data[0].b64_json == c.data[0].b64_json


def test_headers_with_raw_response(gateway: Gateway) -> None:
    raw = gateway.client.images.with_raw_response.generate(model="demo-alias", prompt="x", size="256x256",
                                                           extra_headers={"x-request-id": "trace-abc.123"})
    assert raw.headers["x-request-id"] == "trace-abc.123"
    assert raw.headers["x-imagegate-model"] == "demo"
    assert raw.headers["x-imagegate-provider"] == "demo"
    assert raw.headers["x-imagegate-cost"] == "0.000098"  # 65536 px * 0.0015 $/MP = 98.304 µ$
    assert raw.parse().data[0].b64_json
    bad = gateway.client.images.with_raw_response.generate(model="demo", prompt="x", size="256x256",
                                                           extra_headers={"x-request-id": "bad id\t<script>"})
    assert bad.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "png"])
def test_output_formats(gateway: Gateway, fmt: str) -> None:
    resp = gateway.client.images.generate(model="demo", prompt="x", size="128x64", output_format=fmt,  # type: ignore[arg-type]
                                          output_compression=80 if fmt != "png" else None)
    assert decode(resp.data[0].b64_json).format == {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}[fmt]


def test_transparent_background(gateway: Gateway) -> None:
    resp = gateway.client.images.generate(model="demo", prompt="x", size="128x128", background="transparent")
    img = decode(resp.data[0].b64_json)
    assert img.mode == "RGBA" and img.getextrema()[3][0] < 255  # type: ignore[misc]


def test_response_format_url_is_signed_artifact(gateway: Gateway) -> None:
    resp = gateway.client.images.generate(model="demo", prompt="x", size="64x64", response_format="url")
    url = resp.data[0].url
    assert url and url.startswith(gateway.url + "/v1/artifacts/art_") and "signature=" in url
    got = gateway.http.get(url.removeprefix(gateway.url))
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (64, 64)
    forged = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    assert gateway.http.get(forged.removeprefix(gateway.url)).status_code == 403


def test_edit_single_image_list_and_mask(gateway: Gateway) -> None:
    src = png_bytes(128, 128, (200, 0, 0))
    one = gateway.client.images.edit(model="demo", image=("src.png", src, "image/png"), prompt="blue")
    assert decode(one.data[0].b64_json).size == (128, 128)  # size auto follows the input
    many = gateway.client.images.edit(model="demo", image=[("a.png", src, "image/png"),
                                                            ("b.png", png_bytes(64, 64), "image/png")],
                                      prompt="combine", size="256x256")
    assert decode(many.data[0].b64_json).size == (256, 256)
    mask = png_bytes(128, 128, (0, 0, 0, 0), mode="RGBA")  # fully transparent: edit everything
    masked = gateway.client.images.edit(model="demo", image=("src.png", src, "image/png"),
                                        mask=("mask.png", mask, "image/png"), prompt="x", extra_body={"seed": 3})
    plain = gateway.client.images.generate(model="demo", prompt="x", size="128x128", extra_body={"seed": 3})
    assert decode(masked.data[0].b64_json).tobytes() == decode(plain.data[0].b64_json).convert("RGB").tobytes()


def test_edit_json_with_data_uri_and_uploaded_artifact(gateway: Gateway) -> None:
    src = png_bytes(96, 96)
    uri = "data:image/png;base64," + b64(src)
    r = gateway.http.post("/v1/images/edits", json={"model": "demo", "prompt": "x", "image": uri})
    assert r.status_code == 200, r.text
    up = gateway.http.post("/v1/uploads", files={"file": ("s.png", src, "image/png")})
    assert up.status_code == 200 and up.json()["width"] == 96
    art = up.json()["id"]
    r2 = gateway.http.post("/v1/images/edits", json={"model": "demo", "prompt": "x", "images": [{"file_id": art}],
                                                     "n": 2})
    assert r2.status_code == 200 and len(r2.json()["data"]) == 2


def test_async_client_concurrent(gateway: Gateway) -> None:
    async def main() -> list[int]:
        seeds: list[int] = []

        async def one(i: int) -> None:
            r = await gateway.aclient.images.generate(model="demo", prompt=f"p{i}", size="64x64",
                                                      extra_body={"seed": i})
            seeds.append(r.data[0].seed)  # type: ignore[attr-defined]

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
        async with gateway.aclient.images.with_streaming_response.edit(
                model="demo", image=("a.png", png_bytes(), "image/png"), prompt="x") as resp:
            assert resp.status_code == 200
        await gateway.aclient.close()
        return seeds

    assert sorted(anyio.run(main)) == list(range(8))


def test_stream_sends_completed_events(gateway: Gateway) -> None:
    stream = gateway.client.images.generate(model="demo", prompt="x", size="64x64", n=2, stream=True)
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert decode(events[0].b64_json).size == (64, 64)
    edit_events = list(gateway.client.images.edit(model="demo", image=("a.png", png_bytes(), "image/png"),
                                                  prompt="x", stream=True))
    assert edit_events[-1].type == "image_edit.completed"


def test_partial_images_from_a_provider_without_previews_stream_the_completed_events(gateway: Gateway) -> None:
    stream = gateway.client.images.generate(model="demo", prompt="x", size="64x64", n=2, stream=True,
                                            partial_images=2)
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert [decode(e.b64_json).size for e in events] == [(64, 64)] * 2


def test_a_streamed_failure_after_the_stream_began_is_an_error_event(gateway: Gateway,
                                                                       fake_openai: FakeOpenAI) -> None:
    fake_openai.behave(fail_status=400, error_body={"error": {"message": "bad prompt", "type": "invalid_request_error",
                                                              "param": "prompt", "code": None}})
    response = gateway.http.post("/v1/images/generations", json={"model": "remote", "prompt": "x", "size": "256x256",
                                                                  "stream": True, "partial_images": 1})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["error"]
    assert events[0]["error"]["code"] == "upstream_rejected" and events[0]["error"]["param"] == "prompt"


def test_models_endpoints(gateway: Gateway) -> None:
    models = gateway.client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["demo", "remote"]
    card = gateway.client.models.retrieve("demo-alias")
    extra = card.model_extra or {}
    assert card.id == "demo" and card.owned_by == "imagegate"
    assert "generate" in extra["capabilities"] and extra["price_per_mp"] == 0.0015
    assert extra["routes"] == [{"provider": "demo", "enabled": True}]
    assert "api_key" not in gateway.http.get("/v1/models").text


def test_health_ready_metrics(gateway: Gateway) -> None:
    assert gateway.http.get("/healthz").json() == {"status": "ok"}
    assert gateway.http.get("/readyz").status_code == 200
    gateway.client.images.generate(model="demo", prompt="x", size="64x64")
    text = gateway.http.get("/metrics").text
    assert 'imagegate_requests_total{endpoint="/v1/images/generations",model="demo",status="200"}' in text
    assert "imagegate_request_seconds_bucket" in text and 'le="600.0"' in text
    # The histogram holds request durations (milliseconds here), not time since the process began.
    sums = [float(line.split()[-1]) for line in text.splitlines()
            if line.startswith('imagegate_request_seconds_sum{endpoint="/v1/images/generations"')]
    assert sums and all(0 < s < 30 for s in sums)
