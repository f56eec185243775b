"""The shipped catalog (config/examples/): each file passes `imagegate check-config`, loads, and a
gateway serves it, listing the seeds' model ids with their prices and defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagegate.router.config import load
from tests.conftest import StartGateway

EXAMPLES = Path(__file__).resolve().parent.parent / "config" / "examples"


def test_the_catalog_holds_the_three_setups() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == ["a1111-farm.yaml", "comfyui.yaml", "hosted.yaml",
                                                              "local-gpu.yaml"]


@pytest.mark.parametrize("name", ["hosted.yaml", "local-gpu.yaml", "a1111-farm.yaml", "comfyui.yaml"])
def test_check_config_accepts_each_example(name: str) -> None:
    checked = subprocess.run([sys.executable, "-m", "imagegate", "check-config", str(EXAMPLES / name)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    assert "OK" in checked.stdout


def served(tmp_path: Path, start_gateway: StartGateway, name: str) -> dict[str, Any]:
    raw = yaml.safe_load((EXAMPLES / name).read_text())
    raw["state"] = {"url": f"sqlite:///{tmp_path / 'state.db'}"}
    raw["artifacts"] = {"dir": str(tmp_path / "artifacts")}
    raw.setdefault("auth", {})["admin_key"] = "admin-for-examples"
    gw = start_gateway(raw)
    headers = {"authorization": "Bearer admin-for-examples"}
    key = gw.http.post("/admin/keys", json={"name": "x"}, headers=headers).json().get("key")
    models = gw.http.get("/v1/models", headers={"authorization": f"Bearer {key}"}).json()
    return {m["id"]: m for m in models["data"]}


def test_hosted_carries_the_seed_ids_prices_and_native_map(tmp_path: Path, start_gateway: StartGateway) -> None:
    cfg = load(EXAMPLES / "hosted.yaml")
    assert cfg.surfaces.native["gpt-image"] == "gpt-image-1" and cfg.billing.credits_per_usd == 1000
    models = served(tmp_path, start_gateway, "hosted.yaml")
    assert models["gpt-image-1"]["price_per_image"] == {"text_to_image": {"standard": 0.05, "hd": 0.30},
                                                        "image_to_image": {"standard": 0.06, "hd": 0.32}}
    assert {"flux-2-pro", "qwen-image", "qwen-image-edit", "gemini-image"} <= models.keys()


def test_local_gpu_has_the_seed_defaults() -> None:
    cfg = load(EXAMPLES / "local-gpu.yaml")
    assert cfg.models["sdxl"].defaults.steps == 30 and cfg.models["flux-schnell"].defaults.steps == 4
    assert cfg.models["stable-diffusion-1.5"].default_size == "512x512" and "qwen-image" in cfg.models


def test_a1111_farm_is_served(tmp_path: Path, start_gateway: StartGateway) -> None:
    models = served(tmp_path, start_gateway, "a1111-farm.yaml")
    assert [r["provider"] for r in models["sdxl"]["routes"]] == ["box1", "box2"]
    assert models["stable-diffusion-1.5"]["default_size"] == "512x512"
