"""Local backend: images/s through the gateway + `diffusers` provider vs the same pipeline called directly.

An SDXL-architecture pipeline with random weights is built into a temp dir (save_pretrained, no downloads):
on CPU a narrow one (SDXL's block layout, 32/64/128 channels) at 128x128, 8 steps; on CUDA the full-size
SDXL UNet, CLIP-L/bigG text encoders and VAE at 1024x1024, 30 steps. direct: this process loads it with
`StableDiffusionXLPipeline.from_pretrained(dir)` (fp32, no options: the default diffusers call), one call per
image, generator seed SEED+i. gateway: `python -m router.cli serve` on 127.0.0.1 with a diffusers provider
(dtype float32, max_batch 4) over the same dir, driven over HTTP (b64_json) with the same prompt, size, steps,
guidance and seeds at concurrency 1 and 4 (waiting equal requests run as one batched call). speed: the same
with the provider's speed options (CPU: compile; CUDA: bf16 + channels_last + compile; compile dropped if it
fails). Both processes get the same torch thread count; every cell is warmed up (loads, compiles), then the
timed images run in rounds of 4 alternating between the cells, so other load on the machine hits all alike.
Printed: images/s, ratio vs direct, CPU s/image, time inside the provider call (/metrics), a pixel check that
the gateway made the direct images, per-round ratios, and the targets (gateway c=1 within 3% of direct;
speed options faster than the default direct call).

Run from the repository root (CPU: about 3 minutes):  .venv/bin/python bench/local_pipeline.py [IMAGES]
"""

from __future__ import annotations

import base64
import io
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

HOST, PROMPT, SEED, GUIDANCE, PER_ROUND = "127.0.0.1", "a lighthouse on a cliff at dawn, oil painting", 1000, 5.0, 4
TOLERANCE = 2  # 8-bit levels: a batched image equals its single run to ~1e-6 before rounding


@dataclass(frozen=True)
class Setup:
    device: str
    side: int
    steps: int
    images: int  # timed images per cell
    threads: int
    channels: tuple[int, ...]  # UNet block_out_channels (SDXL: 320/640/1280)
    layers: tuple[int, ...]  # transformer_layers_per_block (SDXL: 1/2/10)
    time_dim: int  # addition_time_embed_dim (SDXL: 256)
    vae: tuple[int, ...]  # VAE block_out_channels (SDXL: 128/256/512/512)
    text: tuple[tuple[int, int, int, str], ...]  # (width, layers, heads, act) of text_encoder, text_encoder_2
    speed: dict[str, Any] = field(default_factory=dict)  # the provider's model options of the speed rows


def setup_for(images: int | None) -> Setup:
    if torch.cuda.is_available():
        return Setup("cuda", 1024, 30, images or 8, min(8, os.cpu_count() or 1), (320, 640, 1280), (1, 2, 10), 256,
                     (128, 256, 512, 512), ((768, 12, 12, "quick_gelu"), (1280, 32, 20, "gelu")),
                     {"dtype": "bfloat16", "channels_last": True, "compile": True})
    # On a small CPU box one core is left to the event loop, the HTTP client and the rest of the machine.
    return Setup("cpu", 128, 8, images or 24, max(1, (os.cpu_count() or 2) - 1), (32, 64, 128), (1, 2, 4), 32,
                 (32, 32, 64, 64), ((64, 2, 1, "quick_gelu"), (64, 2, 1, "gelu")), {"compile": True})


def components(s: Setup) -> dict[str, Any]:
    """The pipeline's modules with random weights, built on `s.device` (SDXL's own configs on CUDA)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.local.tiny import clip_tokenizer  # every character a token: no tokenizer files needed

    def encoder(width: int, layers: int, heads: int, act: str, projection: bool) -> Any:
        config = CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                num_attention_heads=heads, hidden_act=act, projection_dim=width, vocab_size=49408,
                                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()

    torch.manual_seed(0)
    (w1, *te1), (w2, *te2) = s.text
    with torch.device(s.device):  # random init of 2.6B parameters is much faster on the GPU
        unet = UNet2DConditionModel(
            sample_size=s.side // 8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=s.channels,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=tuple(max(1, c // 64) for c in s.channels), transformer_layers_per_block=s.layers,
            cross_attention_dim=w1 + w2, addition_embed_type="text_time", addition_time_embed_dim=s.time_dim,
            projection_class_embeddings_input_dim=w2 + 6 * s.time_dim, use_linear_projection=True, norm_num_groups=32)
        vae = AutoencoderKL(block_out_channels=s.vae, down_block_types=("DownEncoderBlock2D",) * len(s.vae),
                            up_block_types=("UpDecoderBlock2D",) * len(s.vae), layers_per_block=2, latent_channels=4,
                            norm_num_groups=32, sample_size=s.side, scaling_factor=0.13025, force_upcast=True)
        text_encoder, text_encoder_2 = encoder(w1, *te1, projection=False), encoder(w2, *te2, projection=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return {"vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "unet": unet,
            "tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer(), "scheduler": scheduler}


def build_model(s: Setup, directory: Path) -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    parts = components(s)
    diffusers.StableDiffusionXLPipeline(**parts, add_watermarker=False).save_pretrained(directory)
    unet_params = sum(p.numel() for p in parts["unet"].parameters())
    print(f"model: SDXL architecture, random weights, UNet {unet_params / 1e6:,.0f}M params, "
          f"{sum(f.stat().st_size for f in directory.rglob('*')) / 1e9:.2f} GB on disk", flush=True)


@dataclass
class Cell:
    path: str
    concurrency: int
    model: str = "same"  # the gateway's model (speed rows: "speed", or "speed-eager" if compiling failed)
    rounds: list[float] = field(default_factory=list)  # seconds of each timed round
    images: int = 0
    cpu: float = 0.0  # CPU seconds of the process that ran the pipeline
    in_provider: float = 0.0  # gateway: seconds inside the provider call (c=1: per request, no overlap)
    pixels: dict[int, np.ndarray] = field(default_factory=dict)  # seed -> HxWx3 uint8


def direct_load(s: Setup, directory: Path) -> Any:
    from diffusers import StableDiffusionXLPipeline

    # The default diffusers call: fp32, no options (add_watermarker=False as the backend does: same work).
    pipe = StableDiffusionXLPipeline.from_pretrained(directory, local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(s.device)


def direct_run(pipe: Any, s: Setup, cell: Cell, seeds: list[int]) -> None:
    cpu0, start = time.process_time(), time.perf_counter()
    images = [pipe(PROMPT, width=s.side, height=s.side, num_inference_steps=s.steps, guidance_scale=GUIDANCE,
                   generator=torch.Generator().manual_seed(seed)).images[0] for seed in seeds]
    cell.rounds.append(time.perf_counter() - start)
    cell.cpu += time.process_time() - cpu0
    cell.images += len(seeds)
    cell.pixels.update({seed: np.asarray(image.convert("RGB")) for seed, image in zip(seeds, images, strict=True)})


def gateway_config(s: Setup, tmp: Path, directory: Path) -> dict[str, Any]:
    same = {"family": "sdxl", "path": str(directory), "dtype": "float32", "warmup": True}
    eager = {**same, **s.speed, "compile": False, "warmup": False}
    models = {"same": same, "speed": {**eager, "compile": s.speed.get("compile", False)}, "speed-eager": eager}
    limits = {"min_side": 64, "max_side": 2048, "multiple_of": 8, "max_n": 4}
    return {"server": {"host": HOST, "request_timeout_s": 3600}, "state": {"url": f"sqlite:///{tmp / 'state.db'}"},
            "artifacts": {"dir": str(tmp / "artifacts")},
            "providers": {"local": {"type": "diffusers", "device": s.device, "max_batch": 4, "max_concurrency": 4,
                                    "timeout_s": 3600, "models": models}},
            "models": {name: {"limits": limits, "default_size": f"{s.side}x{s.side}",
                              "routes": [{"provider": "local", "model": name}]} for name in models},
            "default_model": "same"}


def start_gateway(s: Setup, tmp: Path, directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    (tmp / "bench.yaml").write_text(yaml.safe_dump(gateway_config(s, tmp, directory)))
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(s.threads),
           "MKL_NUM_THREADS": str(s.threads)}
    log = (tmp / "gateway.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "imagegate", "serve", "--config", str(tmp / "bench.yaml"),
                             "--port", str(port), "--log-level", "warning"], cwd=tmp, env=env, stdout=log, stderr=log)
    url, deadline = f"http://{HOST}:{port}", time.monotonic() + 900  # `same` loads before the port opens
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the gateway did not start:\n" + (tmp / "gateway.log").read_text()[-3000:])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def provider_seconds(url: str) -> float:
    """Sum of imagegate_upstream_seconds: time spent in provider calls (worker queue, pipeline, PNG encode)."""
    lines = httpx.get(f"{url}/metrics", timeout=60).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("imagegate_upstream_seconds_sum"))


def post_all(client: httpx.Client, url: str, s: Setup, cell: Cell, seeds: list[int]) -> dict[int, str]:
    """One n=1 request per seed, `concurrency` in flight; the b64 answers are decoded after the timing."""
    def one(seed: int) -> str:
        body = {"model": cell.model, "prompt": PROMPT, "size": f"{s.side}x{s.side}", "n": 1, "seed": seed,
                "steps": s.steps, "guidance_scale": GUIDANCE, "response_format": "b64_json"}
        resp = client.post(f"{url}/v1/images/generations", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"{cell.model}: the gateway answered {resp.status_code}: {resp.text[:300]}")
        return str(resp.json()["data"][0]["b64_json"])

    with ThreadPoolExecutor(cell.concurrency) as pool:  # each thread posts its next seed when answered
        return dict(zip(seeds, pool.map(one, seeds), strict=True))


def gateway_run(client: httpx.Client, url: str, pid: int, s: Setup, cell: Cell, seeds: list[int]) -> None:
    cpu0, inside, start = cpu_seconds(pid), provider_seconds(url), time.perf_counter()
    answers = post_all(client, url, s, cell, seeds)
    cell.rounds.append(time.perf_counter() - start)
    cell.cpu += cpu_seconds(pid) - cpu0
    cell.in_provider += provider_seconds(url) - inside
    cell.images += len(seeds)
    for seed, b64 in answers.items():
        cell.pixels[seed] = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def warm_up(cells: list[Cell], run: Callable[[Cell, list[int]], None]) -> None:
    """First calls of each cell untimed: loads, allocations, compiles (c=4: the batch sizes too)."""
    for c in cells:
        started = time.perf_counter()
        try:
            run(Cell(c.path, c.concurrency, c.model), [SEED + 10_000 + i for i in range(c.concurrency)])
        except RuntimeError as exc:
            if c.model != "speed":
                raise
            print(f"compile failed, speed rows without it: {exc}")
            for other in cells:
                other.model = "speed-eager" if other.model == "speed" else other.model
            run(Cell(c.path, c.concurrency, c.model), [SEED + 10_000 + i for i in range(c.concurrency)])
        print(f"warm-up {c.path} c={c.concurrency} ({c.model}): {time.perf_counter() - started:.1f} s", flush=True)


def measure(s: Setup, pipe: Any, url: str, pid: int) -> list[Cell]:
    cells = [Cell("direct", 1), Cell("gateway", 1), Cell("gateway", 4), Cell("speed", 1, "speed"),
             Cell("speed", 4, "speed")]
    client = httpx.Client(timeout=3600, limits=httpx.Limits(max_connections=4, max_keepalive_connections=4))

    def run(c: Cell, seeds: list[int]) -> None:
        if c.path == "direct":
            direct_run(pipe, s, c, seeds)
        else:
            gateway_run(client, url, pid, s, c, seeds)

    with client:
        warm_up(cells, run)
        for first in range(SEED, SEED + s.images, PER_ROUND):
            for c in cells:
                run(c, list(range(first, min(first + PER_ROUND, SEED + s.images))))
    return cells


def max_diff(cell: Cell, reference: Cell) -> int:
    return max(int(np.abs(cell.pixels[k].astype(int) - reference.pixels[k].astype(int)).max()) for k in cell.pixels)


def report(s: Setup, cells: list[Cell]) -> None:
    direct = cells[0]
    rate = {(c.path, c.concurrency): c.images / sum(c.rounds) for c in cells}
    print(f"\n{'path':<8} {'conc':>4} {'model':<11} {'images':>6} {'seconds':>8} {'images/s':>9} {'vs direct':>9} "
          f"{'CPU s/img':>9} {'provider s/img':>14} {'max px diff':>11}")
    for c in cells:
        inside = f"{c.in_provider / c.images:14.3f}" if c.path != "direct" and c.concurrency == 1 else f"{'-':>14}"
        print(f"{c.path:<8} {c.concurrency:>4} {c.model if c.path != 'direct' else '-':<11} {c.images:>6} "
              f"{sum(c.rounds):>8.2f} {rate[c.path, c.concurrency]:>9.3f} "
              f"{rate[c.path, c.concurrency] / rate['direct', 1]:>9.3f} {c.cpu / c.images:>9.3f} {inside} "
              f"{max_diff(c, direct):>11}")
    same = all(max_diff(c, direct) <= TOLERANCE for c in cells if c.path == "gateway")
    print(f"\nsame images: every gateway image equals the direct image of its seed within {TOLERANCE}/255: "
          f"{'yes' if same else 'NO'} (direct image std {direct.pixels[SEED].std():.1f}, not blank; the speed rows "
          f"{'differ as bf16 does' if 'dtype' in s.speed else 'match too'})")
    gw = cells[1]
    per_direct, per_gw = sum(direct.rounds) / direct.images, sum(gw.rounds) / gw.images
    print(f"gateway c=1 per image: {1000 * (per_gw - per_direct):+.1f} ms vs direct, of which "
          f"{1000 * (per_gw - gw.in_provider / gw.images):.1f} ms outside the provider call (HTTP, validation, "
          f"base64, JSON); PNG encode of one image on the worker thread: {png_ms(direct):.1f} ms")
    rounds = np.array(direct.rounds) / np.array(gw.rounds)
    error = rounds.std(ddof=1) / np.sqrt(len(rounds)) if len(rounds) > 1 else float("nan")
    print(f"per-round gateway/direct ratios at c=1 (the machine's noise): {' '.join(f'{r:.3f}' for r in rounds)}; "
          f"mean {rounds.mean():.3f} +- {error:.3f} (standard error)")
    ratio = rate["gateway", 1] / rate["direct", 1]
    print(f"gateway/direct at c=1: {ratio:.3f}  (target >= 0.97: {'met' if ratio >= 0.97 else 'MISSED'})")
    speed = rate["speed", 1] / rate["direct", 1]
    options = {**s.speed, "compile": cells[3].model == "speed" and s.speed.get("compile", False)}
    print(f"speed options {options} at c=1 vs the default diffusers call: {speed:.3f}  "
          f"(target > 1: {'met' if speed > 1 else 'MISSED'}); at c=4: {rate['speed', 4] / rate['direct', 1]:.3f}")


def png_ms(cell: Cell) -> float:
    image, start = Image.fromarray(cell.pixels[SEED]), time.perf_counter()
    for _ in range(5):
        image.save(io.BytesIO(), format="PNG")
    return (time.perf_counter() - start) / 5 * 1000


def main() -> None:
    s = setup_for(int(sys.argv[1]) if len(sys.argv) > 1 else None)
    torch.set_num_threads(s.threads)
    device = torch.cuda.get_device_name(0) if s.device == "cuda" else platform.processor() or platform.machine()
    import diffusers

    print(f"machine: {os.cpu_count()} CPUs, device {s.device} ({device}); Python {platform.python_version()}, "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"threads: torch.set_num_threads({s.threads}) here (torch.get_num_threads() = {torch.get_num_threads()}), "
          f"OMP_NUM_THREADS=MKL_NUM_THREADS={s.threads} for the gateway")
    print(f"work: {s.side}x{s.side}, {s.steps} steps, guidance {GUIDANCE}, seeds {SEED}..{SEED + s.images - 1}: "
          f"{s.images} timed images per cell, in rounds of {PER_ROUND} alternating between the cells", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="imagegate-local-bench-"))
    gateway: subprocess.Popen[bytes] | None = None
    try:
        started = time.perf_counter()
        build_model(s, tmp / "model")
        print(f"built and saved in {time.perf_counter() - started:.1f} s", flush=True)
        pipe = direct_load(s, tmp / "model")  # stays loaded: fine on CPU and on an H200 (fp32 SDXL ~14 GB)
        gateway, url = start_gateway(s, tmp, tmp / "model")
        report(s, measure(s, pipe, url, gateway.pid))
    except BaseException:
        if (tmp / "gateway.log").exists():
            print("gateway log (tail):\n" + (tmp / "gateway.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        if gateway is not None:
            gateway.terminate()
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
