"""A tiny local diffusers pipeline behind the AUTOMATIC1111 surface: webuiapi gets the same images
for a seed as the OpenAI surface does."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import webuiapi

from tests.conftest import Gateway, base_config, decode, serve_gateway
from tests.local.tiny import save_family


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    sd15 = save_family("sd15", tmp_path_factory.mktemp("tiny") / "sd15")
    cfg = base_config(tmp_path_factory.mktemp("gw"))
    cfg["providers"]["gpu"] = {"type": "diffusers", "device": "cpu", "models": {"sd15": {"family": "sd15",
                                                                                         "path": str(sd15)}}}
    cfg["models"]["sd"] = {"limits": {"min_side": 32, "max_side": 256, "multiple_of": 16, "max_n": 4},
                           "default_size": "64x64", "defaults": {"steps": 4, "guidance_scale": 5.0},
                           "routes": [{"provider": "gpu", "model": "sd15"}]}
    with serve_gateway(cfg) as gateway:
        yield gateway


def test_webuiapi_on_a_local_pipeline_matches_v1(gw: Gateway) -> None:
    api = webuiapi.WebUIApi(baseurl=f"{gw.url}/sdapi/v1")
    result = api.txt2img(prompt="a lighthouse", seed=21, width=64, height=64, steps=3, cfg_scale=4.0,
                         batch_size=2, override_settings={"sd_model_checkpoint": "sd"})
    assert result.info["all_seeds"] == [21, 22] and result.info["steps"] == 3
    same = gw.client.images.generate(model="sd", prompt="a lighthouse", size="64x64", n=2,
                                     extra_body={"seed": 21, "steps": 3, "guidance_scale": 4.0})
    for mine, theirs in zip(result.images, same.data or [], strict=True):
        a, b = mine.convert("RGB").tobytes(), decode(theirs.b64_json or "").convert("RGB").tobytes()
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 2  # batched vs batched: rounding only
