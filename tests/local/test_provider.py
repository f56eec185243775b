"""The `diffusers` provider through a live gateway and the official SDK, and `imagegate worker`.

Tiny random pipelines are built and saved at test time (tests/local/tiny.py) and loaded back through
the same loading code users run; the gateway runs them on this machine's CPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.conftest import Gateway, base_config, decode, free_port, png_bytes, sdk, serve_gateway, wait_until_healthy
from tests.local.tiny import save_family

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny-models")
    return {family: save_family(family, base / family) for family in ("sd15", "flux")}


def local_config(tmp: Path, dirs: dict[str, Path], **provider: Any) -> dict[str, Any]:
    cfg = base_config(tmp)
    broken = tmp / "broken-model"
    broken.mkdir(exist_ok=True)
    (broken / "model_index.json").write_text("{not json")
    cfg["providers"]["gpu"] = {"type": "diffusers", "device": "cpu", "max_concurrency": 4, "models": {
        "sd15": {"family": "sd15", "path": str(dirs["sd15"])},
        "flux": {"family": "flux", "path": str(dirs["flux"])},
        # Its warm-up fails at start: the provider must still serve the others.
        "broken": {"family": "sd15", "path": str(broken), "warmup": True}}, **provider}
    limits = {"min_side": 32, "max_side": 256, "multiple_of": 16, "max_n": 4}
    cfg["models"].update({
        "sd": {"limits": limits, "default_size": "64x64", "defaults": {"steps": 4, "guidance_scale": 5.0},
               "capabilities": ["generate", "edit", "inpaint"], "routes": [{"provider": "gpu", "model": "sd15"}]},
        "flux": {"limits": limits, "default_size": "32x32", "defaults": {"steps": 3},
                 "routes": [{"provider": "gpu", "model": "flux"}]},
        "broken": {"limits": limits, "routes": [{"provider": "gpu", "model": "broken"}]},
        "sd-extra": {"limits": limits, "allow_extra_fields": True, "routes": [{"provider": "gpu", "model": "sd15"}]},
    })
    return cfg


@pytest.fixture(scope="module")
def gw(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with serve_gateway(local_config(tmp_path_factory.mktemp("gw"), model_dirs)) as gateway:
        yield gateway


def pixels(b64_json: str) -> bytes:
    return decode(b64_json).convert("RGB").tobytes()


def same_image(a: str, b: str, tolerance: int = 2) -> bool:
    """Equal up to rounding: a batched image matches its single run to ~1e-6 before 8-bit rounding."""
    pa, pb = pixels(a), pixels(b)
    return len(pa) == len(pb) and max(abs(x - y) for x, y in zip(pa, pb, strict=True)) <= tolerance


def test_generation_is_deterministic_per_seed(gw: Gateway) -> None:
    first = sdk(gw).images.generate(model="sd", prompt="a lighthouse", size="64x64", n=2, extra_body={"seed": 7})
    again = sdk(gw).images.generate(model="sd", prompt="a lighthouse", size="64x64", n=1, extra_body={"seed": 8})
    assert [d.seed for d in first.data] == [7, 8]  # type: ignore[attr-defined]
    assert [decode(d.b64_json).size for d in first.data] == [(64, 64)] * 2
    # Image 1 of the first call (seed 8) is the image of a call made with seed 8 alone.
    assert same_image(first.data[1].b64_json, again.data[0].b64_json)
    assert pixels(first.data[0].b64_json) != pixels(first.data[1].b64_json)


def test_flux_and_output_formats(gw: Gateway) -> None:
    result = sdk(gw).images.generate(model="flux", prompt="p", size="48x32", output_format="webp")
    image = decode(result.data[0].b64_json)
    assert (image.format, image.size) == ("WEBP", (48, 32))


def test_img2img_and_inpainting_through_the_sdk(gw: Gateway) -> None:
    source = png_bytes(64, 64, (200, 30, 30))
    edited = sdk(gw).images.edit(model="sd", image=("src.png", source, "image/png"), prompt="blue",
                                 extra_body={"seed": 3, "strength": 0.6})
    assert decode(edited.data[0].b64_json).size == (64, 64)
    mask = png_bytes(64, 64, (0, 0, 0, 0), mode="RGBA")  # all transparent: edit everything
    inpainted = sdk(gw).images.edit(model="sd", image=("src.png", source, "image/png"),
                                    mask=("mask.png", mask, "image/png"), prompt="blue", extra_body={"seed": 3})
    assert decode(inpainted.data[0].b64_json).size == (64, 64)
    assert pixels(inpainted.data[0].b64_json) != pixels(edited.data[0].b64_json)


def test_stream_sends_real_partial_images_then_the_result(gw: Gateway) -> None:
    events = list(sdk(gw).images.generate(model="sd", prompt="p", size="64x64", stream=True, partial_images=2,
                                          extra_body={"seed": 11, "steps": 6}))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]  # type: ignore[attr-defined]
    previews = [decode(e.b64_json) for e in events[:2]]
    final = decode(events[-1].b64_json)
    assert final.size == (64, 64) and all(p.size[0] > 0 for p in previews)
    assert previews[0].tobytes() != previews[1].tobytes()  # taken at different steps


def test_a_broken_model_is_a_clear_503_and_the_gateway_lives_on(gw: Gateway) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        sdk(gw).images.generate(model="broken", prompt="p", size="64x64")
    assert info.value.status_code == 503
    body = info.value.response.json()["error"]
    assert body["code"] == "model_load_failed" and "broken" in body["message"]
    assert "Traceback" not in info.value.response.text
    assert sdk(gw).images.generate(model="sd", prompt="p", size="64x64").data[0].b64_json


def test_a_local_job_past_the_providers_timeout_is_a_504(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """`timeout_s` bounds a local call (queue wait, load and steps) as it does a remote one, so a
    model's next route gets its turn (stopping a cancelled job at its next step is tested in
    test_worker.py)."""
    with serve_gateway(local_config(tmp_path, model_dirs, timeout_s=0.2)) as slow:
        with pytest.raises(openai.APIStatusError) as info:
            sdk(slow).images.generate(model="sd", prompt="p", size="256x256", extra_body={"steps": 60})
        assert info.value.status_code == 504
        assert info.value.response.json()["error"]["code"] == "upstream_timeout"


def test_an_unknown_lora_is_a_400_not_a_500(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(gw).images.generate(model="sd-extra", prompt="p", size="64x64", extra_body={"lora": "no-such-lora"})
    assert info.value.code == "upstream_rejected" and "no-such-lora" in info.value.message


def test_local_backend_metrics(gw: Gateway) -> None:
    sdk(gw).images.generate(model="sd", prompt="p", size="64x64")
    text = gw.http.get("/metrics").text
    for name in ("imagegate_local_pipeline_loads_total", "imagegate_local_resident_pipelines",
                 "imagegate_local_step_seconds", "imagegate_local_images_total"):
        assert name in text, name


def test_a_gateway_routes_to_an_imagegate_worker(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    worker_cfg = local_config(tmp_path, model_dirs)
    worker_cfg["providers"]["gpu"]["models"]["sd15"]["warmup"] = True
    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump(worker_cfg))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "imagegate", "worker", "--config", str(path), "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, env=env, start_new_session=True)
    try:
        worker_url = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, worker_url)
        gateway_cfg = base_config(tmp_path / "gw")
        gateway_cfg["providers"]["box"] = {"type": "openai", "base_url": f"{worker_url}/v1",
                                           "response_format": "b64_json"}
        gateway_cfg["models"]["sd-remote"] = {"limits": {"min_side": 32, "max_side": 256, "multiple_of": 16},
                                              "routes": [{"provider": "box", "model": "sd"}]}
        with serve_gateway(gateway_cfg) as gateway:
            resp = sdk(gateway).images.with_raw_response.generate(model="sd-remote", prompt="p", size="64x64", n=2,
                                                                  extra_body={"seed": 21, "steps": 3})
            assert resp.headers["x-imagegate-provider"] == "box"
            data = resp.parse().data
            assert [d.seed for d in data] == [21, 22]  # type: ignore[attr-defined]
            direct = httpx.post(f"{worker_url}/v1/images/generations", timeout=60, json={
                "model": "sd", "prompt": "p", "size": "64x64", "seed": 22, "steps": 3}).json()
            assert same_image(data[1].b64_json, direct["data"][0]["b64_json"])
            metrics = httpx.get(f"{worker_url}/metrics").text.splitlines()
            assert any(line.startswith("imagegate_local_pipeline_loads_total{") for line in metrics)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
