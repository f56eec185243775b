"""The `comfyui` kind through the official `openai` SDK against a live gateway, in front of
FakeComfyUI (HTTP + WebSocket on 127.0.0.1): the graph it receives, pixels and seeds, inpainting,
previews, cancel, progress, and every failure mapped as documented."""

from __future__ import annotations

import concurrent.futures
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import webuiapi
import yaml
from PIL import Image

from tests.conftest import (
    NO_BREAKER,
    Gateway,
    StartGateway,
    base_config,
    decode,
    expect_error,
    free_port,
    leave_once,
    sdk,
)
from tests.fakes.comfyui_upstream import PAINT, FakeComfyUI, seed_color

TOKEN = "comfy-login-token-31337"
WORKFLOWS = Path(__file__).resolve().parent.parent / "config" / "examples" / "workflows"
T2I = {"prompt": "6.text", "negative_prompt": "7.text", "seed": "3.seed", "steps": "3.steps",
       "guidance_scale": "3.cfg", "sampler": "3.sampler_name", "width": "5.width", "height": "5.height",
       "n": "5.batch_size", "checkpoint": "4.ckpt_name", "scheduler": "3.scheduler"}
INPAINT = {"prompt": "6.text", "seed": "3.seed", "strength": "3.denoise", "image": "10.image", "mask": "11.image",
           "checkpoint": "4.ckpt_name"}
LIMITS = {"min_side": 64, "max_side": 2048, "multiple_of": 8, "max_n": 4}


def workflows(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"t2i": {"file": str(WORKFLOWS / "sdxl_t2i.json"), "inputs": T2I, "outputs": ["9"]},
            "inpaint": {"file": str(WORKFLOWS / "sdxl_inpaint.json"), "inputs": INPAINT, "outputs": ["9"]},
            **(extra or {})}


def comfy_config(tmp: Path, url: str, **provider: Any) -> dict[str, Any]:
    cfg = base_config(tmp)
    cfg["providers"]["comfy"] = {"type": "comfyui", "base_url": url, "api_key": TOKEN, "quiet_s": 0.3,
                                 "timeout_s": 20, "workflows": workflows(provider.pop("extra_workflows", None)),
                                 **NO_BREAKER, **provider}

    def model(upstream: str = "sd_xl_base_1.0.safetensors", **route: Any) -> dict[str, Any]:
        return {"price_per_mp": 0.002, "limits": LIMITS, "default_size": "512x512",
                "defaults": {"steps": 12, "guidance_scale": 5.5},
                "routes": [{"provider": "comfy", "model": upstream, "workflow": "t2i", "edit_workflow": "inpaint",
                            **route}]}

    only_t2i = [{"provider": "comfy", "model": "sd_xl_base_1.0.safetensors", "workflow": "t2i"}]
    cfg["models"].update({"sdxl": model(), "ghost": model("missing.safetensors"),
                          "t2i-only": {**model(), "routes": only_t2i}})
    return cfg


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeComfyUI]:
    with FakeComfyUI(TOKEN) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(fake: FakeComfyUI) -> None:
    fake.reset()


@pytest.fixture
def gw(tmp_path: Path, fake: FakeComfyUI, start_gateway: StartGateway) -> Gateway:
    return start_gateway(comfy_config(tmp_path, fake.url))


def test_a_generation_fills_the_mapped_places_and_reads_the_outputs(gw: Gateway, fake: FakeComfyUI) -> None:
    result = sdk(gw).images.generate(model="sdxl", prompt="a lighthouse", size="640x384", n=2,
                                     extra_body={"seed": 21, "negative_prompt": "fog", "steps": 9,
                                                 "guidance_scale": 4.0})
    [graph] = fake.graphs
    assert graph["6"]["inputs"]["text"] == "a lighthouse" and graph["7"]["inputs"]["text"] == "fog"
    assert (graph["3"]["inputs"]["seed"], graph["3"]["inputs"]["steps"], graph["3"]["inputs"]["cfg"]) == (21, 9, 4.0)
    assert (graph["5"]["inputs"]["width"], graph["5"]["inputs"]["height"], graph["5"]["inputs"]["batch_size"]) == \
        (640, 384, 2)
    assert graph["4"]["inputs"]["ckpt_name"] == "sd_xl_base_1.0.safetensors"  # the route's model
    assert graph["3"]["inputs"]["sampler_name"] == "dpmpp_2m"  # unmapped by the request: the workflow's own
    assert [d.seed for d in result.data or []] == [21, 22]  # type: ignore[attr-defined]
    for item, seed in zip(result.data or [], (21, 22), strict=True):
        image = decode(item.b64_json or "")
        assert image.size == (640, 384) and image.convert("RGB").getpixel((5, 5)) == seed_color(seed)
    [prompt] = fake.prompts.values()
    assert fake.history_deletes == [prompt.id] and prompt.client_id  # our prompt id, then its history pruned


def test_images_come_from_the_history_once_written_when_the_socket_missed_them(gw: Gateway,
                                                                                fake: FakeComfyUI) -> None:
    # Real ComfyUI sends execution_success before it writes /history: read too soon, it is empty.
    fake.behave(executed_events=False, history_lag_s=0.4)
    result = sdk(gw).images.generate(model="sdxl", prompt="p", size="256x256", n=2)
    assert [d.seed for d in result.data] == [result.data[0].seed, result.data[0].seed + 1]  # type: ignore[attr-defined]
    assert len({decode(d.b64_json or "").getpixel((5, 5)) for d in result.data}) == 2


def test_the_event_socket_is_one_per_instance(gw: Gateway, fake: FakeComfyUI) -> None:
    for seed in (1, 2):
        sdk(gw).images.generate(model="sdxl", prompt="p", size="256x256", extra_body={"seed": seed})
    assert len({p.client_id for p in fake.prompts.values()}) == 1 and len(fake.sockets) == 1


def test_an_inpaint_uploads_the_image_and_mask_under_unique_names(gw: Gateway, fake: FakeComfyUI) -> None:
    source = Image.new("RGB", (256, 128), (0, 90, 0))
    mask = Image.new("RGBA", (256, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 128, 128))  # OpenAI: transparent = edit, the left half

    def png(image: Image.Image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue()

    result = sdk(gw).images.edit(model="sdxl", prompt="a door", image=("a.png", png(source), "image/png"),
                                 mask=("m.png", png(mask), "image/png"), size="256x128")
    [graph] = fake.graphs
    image_ref, mask_ref = graph["10"]["inputs"]["image"], graph["11"]["inputs"]["image"]
    assert image_ref.startswith("imagegate/imagegate-") and mask_ref.startswith("imagegate/imagegate-")
    assert image_ref != mask_ref and sorted(fake.uploads) == sorted([image_ref, mask_ref])
    assert graph["3"]["inputs"]["denoise"] == 0.75  # strength: the edit default
    out = decode(result.data[0].b64_json or "").convert("RGB")  # type: ignore[index]
    assert out.getpixel((20, 64)) == PAINT and out.getpixel((230, 64)) == (0, 90, 0)


def test_streamed_previews_then_the_image(gw: Gateway, fake: FakeComfyUI) -> None:
    fake.behave(steps=4, previews=3)
    events = list(sdk(gw).images.generate(model="sdxl", prompt="p", size="256x256", stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    first = decode(events[0].b64_json)
    assert first.format == "PNG" and first.size == (256, 256)  # ComfyUI's small JPEG previews, as asked


def test_progress_reaches_the_task(gw: Gateway, fake: FakeComfyUI) -> None:
    fake.behave(steps=20, step_delay_s=0.15)
    task = gw.http.post("/v1/images/generations", json={"model": "sdxl", "prompt": "p", "size": "256x256",
                                                         "async": True}).json()
    seen, deadline = [], time.monotonic() + 30
    while (current := gw.http.get(f"/v1/tasks/{task['id']}").json())["status"] != "succeeded":
        seen.append(current["progress"])
        assert time.monotonic() < deadline and current["status"] in ("queued", "running"), current
        time.sleep(0.05)
    assert any(0 < p < 1 for p in seen), seen  # ComfyUI's step progress, written while it ran


def test_the_servers_queue_and_progress_are_metrics(gw: Gateway, fake: FakeComfyUI) -> None:
    fake.behave(steps=40, step_delay_s=0.1)
    task = gw.http.post("/v1/images/generations", json={"model": "sdxl", "prompt": "p", "size": "256x256",
                                                         "async": True}).json()

    def gauges() -> tuple[float | None, float | None]:
        text = gw.http.get("/metrics").text
        found = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("imagegate_upstream_") and 'provider="comfy"' in line}
        return found.get("imagegate_upstream_server_queue"), found.get("imagegate_upstream_progress")

    deadline = time.monotonic() + 30
    while not ((seen := gauges())[0] == 1 and 0 < (seen[1] or 0) < 1):
        assert time.monotonic() < deadline, seen  # our prompt in ComfyUI's queue, part way through
        time.sleep(0.05)
    while gw.http.get(f"/v1/tasks/{task['id']}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    while gauges() != (0, 0):  # the server's idle status reaches the socket after the answer
        assert time.monotonic() < deadline, gauges()
        time.sleep(0.05)


def test_the_a1111_surface_shows_comfyuis_steps_and_previews(gw: Gateway, fake: FakeComfyUI) -> None:
    fake.behave(steps=30, step_delay_s=0.1, previews=30)
    api = webuiapi.WebUIApi(baseurl=f"{gw.url}/sdapi/v1")
    with concurrent.futures.ThreadPoolExecutor() as pool:
        running = pool.submit(api.txt2img, prompt="p", width=256, height=256,
                              override_settings={"sd_model_checkpoint": "sdxl"})
        deadline = time.monotonic() + 30
        while not (0 < (progress := api.get_progress())["progress"] < 1 and progress["current_image"]):
            assert time.monotonic() < deadline and not running.done(), progress
            time.sleep(0.05)
        assert progress["state"]["sampling_steps"] == 30 and progress["state"]["job_count"] == 1
        assert len(running.result(timeout=30).images) == 1


def test_a_cancel_mid_run_removes_and_interrupts_only_our_prompt(gw: Gateway, fake: FakeComfyUI) -> None:
    fake.behave(steps=200, step_delay_s=0.05)
    leave_once(gw, {"model": "sdxl", "prompt": "p", "size": "256x256"}, lambda: fake.running is not None,
               "the prompt to start running")
    deadline = time.monotonic() + 10
    while not fake.interrupts:
        assert time.monotonic() < deadline, "no interrupt came"
        time.sleep(0.02)
    [prompt] = fake.prompts.values()
    assert fake.queue_deletes == [prompt.id] and fake.interrupts == [{"prompt_id": prompt.id}]
    while fake.running is not None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert prompt.status == "interrupted"


@pytest.mark.parametrize(("mode", "status", "code", "text"), [
    ("execution_error", 502, "upstream_execution_failed", "mat1 and mat2"),
    ("oom", 503, "upstream_out_of_memory", "out of memory"),
])
def test_execution_failures_map_as_documented(gw: Gateway, fake: FakeComfyUI, mode: str, status: int, code: str,
                                              text: str) -> None:
    fake.behave(mode=mode)
    err = expect_error(lambda: sdk(gw).images.generate(model="sdxl", prompt="p", size="256x256"), status, TOKEN)
    assert err.code == code and text in err.message
    if status == 503:
        assert int(err.response.headers["retry-after"]) >= 1


def test_a_value_the_node_refuses_is_the_requests_and_names_the_node_and_input(
        fake: FakeComfyUI, tmp_path: Path, start_gateway: StartGateway) -> None:
    cfg = comfy_config(tmp_path, fake.url)
    cfg["models"]["sdxl"]["limits"] = {**LIMITS, "max_n": 16}  # the gateway allows more than the node's max of 8
    wide = start_gateway(cfg)
    err = expect_error(lambda: sdk(wide).images.generate(model="sdxl", prompt="p", size="256x256", n=9), 400, TOKEN)
    assert err.code == "upstream_rejected" and "node 5" in err.message and "batch_size" in err.message
    assert err.param == "5.batch_size" and fake.prompts == {}


def test_a_constant_of_the_workflow_the_node_refuses_is_misconfigured(
        fake: FakeComfyUI, tmp_path: Path, start_gateway: StartGateway) -> None:
    graph = orjson.loads((WORKFLOWS / "sdxl_t2i.json").read_bytes())
    graph["5"]["inputs"]["batch_size"] = 99  # unmapped here, and over the fake's max of 8
    tight = tmp_path / "tight.json"
    tight.write_bytes(orjson.dumps(graph))
    cfg = comfy_config(tmp_path, fake.url, extra_workflows={
        "tight": {"file": str(tight), "inputs": {k: v for k, v in T2I.items() if k != "n"}, "outputs": ["9"]}})
    cfg["models"]["tight"] = {**cfg["models"]["sdxl"], "routes": [{"provider": "comfy", "model":
                                                                    "sd_xl_base_1.0.safetensors", "workflow": "tight"}]}
    tight_gw = start_gateway(cfg)
    err = expect_error(lambda: sdk(tight_gw).images.generate(model="tight", prompt="p", size="256x256"), 502, TOKEN)
    assert err.code == "upstream_misconfigured" and "node 5" in err.message and "batch_size" in err.message


@pytest.mark.parametrize(("asked", "sampler", "scheduler"), [
    ({"sampler_name": "DPM++ 2M Karras"}, "dpmpp_2m", "karras"),
    ({"sampler_name": "Euler a", "scheduler": "Exponential"}, "euler_ancestral", "exponential"),
    ({"sampler_name": "euler", "scheduler": "Automatic"}, "euler", "karras"),  # the workflow's own
])
def test_a1111_sampler_names_become_comfyuis(gw: Gateway, fake: FakeComfyUI, asked: dict[str, str], sampler: str,
                                             scheduler: str) -> None:
    api = webuiapi.WebUIApi(baseurl=f"{gw.url}/sdapi/v1")
    assert len(api.txt2img(prompt="p", width=256, height=256, **asked,
                           override_settings={"sd_model_checkpoint": "sdxl"}).images) == 1
    [prompt] = fake.prompts.values()
    assert (prompt.graph["3"]["inputs"]["sampler_name"], prompt.graph["3"]["inputs"]["scheduler"]) == (sampler,
                                                                                                       scheduler)


def test_a_sampler_the_server_lacks_is_refused_naming_the_input(gw: Gateway, fake: FakeComfyUI) -> None:
    api = webuiapi.WebUIApi(baseurl=f"{gw.url}/sdapi/v1")
    with pytest.raises(RuntimeError, match="sampler_name") as raised:
        api.txt2img(prompt="p", width=256, height=256, sampler_name="Restart",
                    override_settings={"sd_model_checkpoint": "sdxl"})
    status, body = raised.value.args  # A1111's shape: a 422 with `detail`
    assert status == 422 and "upstream_rejected" in body and "'Restart' not in" in body and fake.prompts == {}


def test_a_missing_checkpoint_is_misconfigured_and_falls_back(tmp_path: Path, fake: FakeComfyUI,
                                                              start_gateway: StartGateway) -> None:
    cfg = comfy_config(tmp_path, fake.url)
    cfg["models"]["ghost"]["routes"].append({"provider": "demo", "model": "demo"})
    gw = start_gateway(cfg)
    result = sdk(gw).images.with_raw_response.generate(model="ghost", prompt="p", size="256x256")
    assert result.headers["x-imagegate-provider"] == "demo"  # comfy said misconfigured: the next route served


def test_a_mapping_the_server_does_not_know_is_a_502_naming_the_node(tmp_path: Path, fake: FakeComfyUI,
                                                                     start_gateway: StartGateway) -> None:
    graph = orjson.loads((WORKFLOWS / "sdxl_t2i.json").read_bytes())
    graph["3"]["inputs"]["eta"] = 0.0  # in the file, so the config accepts it; the server's KSampler has no eta
    odd = tmp_path / "odd.json"
    odd.write_bytes(orjson.dumps(graph))
    cfg = comfy_config(tmp_path, fake.url, extra_workflows={
        "odd": {"file": str(odd), "inputs": {**T2I, "guidance_scale": "3.eta"}, "outputs": ["9"]}})
    cfg["models"]["odd"] = {**cfg["models"]["sdxl"], "routes": [{"provider": "comfy", "model":
                                                                  "sd_xl_base_1.0.safetensors", "workflow": "odd"}]}
    gw = start_gateway(cfg)
    err = expect_error(lambda: sdk(gw).images.generate(model="odd", prompt="p", size="256x256"), 502, TOKEN)
    assert err.code == "upstream_misconfigured" and "3.eta" in err.message and fake.graphs == []


@pytest.mark.parametrize("mode", ["silent", "drop"])
def test_a_quiet_or_dropped_socket_falls_back_to_history(gw: Gateway, fake: FakeComfyUI, mode: str) -> None:
    fake.behave(mode=mode, steps=3, step_delay_s=0.05)
    result = sdk(gw).images.generate(model="sdxl", prompt="p", size="256x256", extra_body={"seed": 4})
    assert decode(result.data[0].b64_json or "").convert("RGB").getpixel((1, 1)) == seed_color(4)  # type: ignore[index]


def test_an_unreachable_server_is_a_connect_failure(tmp_path: Path, start_gateway: StartGateway) -> None:
    gw = start_gateway(comfy_config(tmp_path, f"http://127.0.0.1:{free_port()}"))
    err = expect_error(lambda: sdk(gw).images.generate(model="sdxl", prompt="p", size="256x256"), 503, TOKEN)
    assert err.code == "upstream_unavailable"


def test_an_edit_without_an_edit_workflow_is_refused_before_any_call(gw: Gateway, fake: FakeComfyUI) -> None:
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, "PNG")
    err = expect_error(lambda: sdk(gw).images.edit(model="t2i-only", prompt="p", image=("a.png", png.getvalue(),
                                                                                      "image/png")), 400, TOKEN)
    assert err.code == "unsupported_by_upstream" and "edit_workflow" in err.message
    assert fake.graphs == [] and fake.uploads == []


def test_the_admin_view_shows_the_socket(tmp_path: Path, fake: FakeComfyUI, start_gateway: StartGateway) -> None:
    cfg = comfy_config(tmp_path, fake.url)
    cfg["auth"] = {"admin_key": "adm"}
    gw = start_gateway(cfg)
    sdk(gw).images.generate(model="sdxl", prompt="p", size="256x256")
    view = httpx.get(f"{gw.url}/admin/providers", headers={"authorization": "Bearer adm"}).json()["data"]["comfy"]
    assert view["type"] == "comfyui" and view["socket"] == "connected" and view["max_concurrency"] == 1


def check(tmp_path: Path, workflow: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    cfg = {"providers": {"c": {"type": "comfyui", "workflows": {"w": workflow}}},
           "models": {"m": {"price_per_mp": 0, "routes": [{"provider": "c", "model": "x", "workflow": "w"}]}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "imagegate", "check-config", str(path)], capture_output=True,
                          text=True, check=False)


def test_check_config_reads_and_checks_the_workflow(tmp_path: Path) -> None:
    (tmp_path / "ui.json").write_text('{"nodes": [], "links": []}')
    (tmp_path / "t2i.json").write_bytes((WORKFLOWS / "sdxl_t2i.json").read_bytes())
    good = {"file": "t2i.json", "inputs": {"prompt": "6.text"}, "outputs": ["9"]}
    assert check(tmp_path, good).returncode == 0  # relative to the config file
    for bad, says in (({**good, "file": "ui.json"}, "Save (API)"), ({**good, "file": "none.json"}, "cannot read"),
                      ({**good, "inputs": {"prompt": "66.text"}}, "node 66"),
                      ({**good, "inputs": {"prompt": "6.txt"}}, "no input 'txt'"),
                      ({**good, "inputs": {"prompt": "6"}}, "node_id.input"), ({**good, "outputs": ["99"]}, "99")):
        result = check(tmp_path, bad)
        assert result.returncode == 1 and says in result.stderr, (bad, result.stderr)
