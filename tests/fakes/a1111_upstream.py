"""A fake AUTOMATIC1111 webui API (`--api`, optionally `--api-auth user:pass`).

It follows A1111's own code (modules/api/api.py, processing.py, progress.py): HTTP Basic on every
`/sdapi` route with the middleware's error body, one generation at a time behind a queue lock,
`info` as a JSON string with `all_seeds = seed + i`, base64 PNGs without a data: prefix, an unknown
checkpoint or sampler silently replaced (as the real server does), task ids for `/internal/progress`
and `/sdapi/v1/interrupt`. Images are solid colours of the asked size; img2img returns the init image
resized, with the region the mask marks for editing (white, or opaque alpha) painted `PAINT`, so a test
can check which region was edited. Every request is recorded; `behave(...)` makes it misbehave.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import time
from dataclasses import dataclass
from typing import Any

import orjson
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .server import FakeUpstream

PAINT = (255, 0, 255)
GRID_COLOR = (1, 1, 1)
CHECKPOINTS = [
    {"title": "sd_xl_base_1.0.safetensors [31e35c80fc]", "model_name": "sd_xl_base_1.0", "hash": "31e35c80fc",
     "sha256": "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
     "filename": "/models/Stable-diffusion/sd_xl_base_1.0.safetensors", "config": None},
    {"title": "sd15/v1-5-pruned-emaonly.safetensors [6ce0161689]", "model_name": "sd15_v1-5-pruned-emaonly",
     "hash": "6ce0161689", "sha256": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
     "filename": "/models/Stable-diffusion/sd15/v1-5-pruned-emaonly.safetensors", "config": None},
]
SAMPLERS = [
    {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}},
    {"name": "Euler a", "aliases": ["k_euler_a"], "options": {}},
    {"name": "Euler", "aliases": ["k_euler"], "options": {}},
]
OOM = ("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.65 GiB total capacity; 14.20 GiB already "
       "allocated; 7.31 GiB free; 14.50 GiB reserved in total by PyTorch)")
# FastAPI's own request-validation answer (A1111 does not catch RequestValidationError).
VALIDATION_422 = {"detail": [{"loc": ["body", "width"], "msg": "value is not a valid integer",
                              "type": "type_error.integer"}]}
_INT_FIELDS = ("width", "height", "steps", "batch_size", "n_iter", "seed")
_FLOAT_FIELDS = ("cfg_scale", "denoising_strength", "hr_scale")


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def seed_color(seed: int) -> tuple[int, int, int]:
    return ((seed * 37) % 200 + 20, (seed * 91) % 200 + 20, (seed * 53) % 200 + 20)


def a1111_error(status: int, detail: str, errors: str | None = None, *, sdnext: bool = False) -> JSONResponse:
    """A1111's api_middleware.handle_exception body; SD.Next adds `code`."""
    body: dict[str, Any] = {"error": "HTTPException" if errors is None else "OutOfMemoryError",
                            "detail": detail, "body": "", "errors": errors or f"{status}: {detail}"}
    if sdnext:
        body["code"] = status
    return JSONResponse(body, status_code=status)


def edit_mask(mask_b64: str, size: tuple[int, int]) -> Image.Image:
    """A1111's create_binary_mask: the alpha channel when it is not all opaque, else grayscale; >128 = edit."""
    mask: Image.Image = Image.open(io.BytesIO(base64.b64decode(mask_b64)))
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.getchannel("A")
    mask = mask.convert("L").resize(size, Image.Resampling.NEAREST)
    return mask.point(lambda v: 255 if v > 128 else 0)


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    json: Any = None


class FakeA1111(FakeUpstream):
    def __init__(self, username: str | None = None, password: str | None = None) -> None:
        self.credentials = (username, password) if username else None
        self.requests: list[Recorded] = []
        self.checkpoints = list(CHECKPOINTS)
        self.loaded = CHECKPOINTS[0]["title"]
        self.interrupted: list[str] = []
        self.behave()
        self._lock: asyncio.Lock | None = None
        self._current: str | None = None
        self._pending: set[str] = set()
        self._interrupt = False
        self.app = Starlette(routes=[
            Route("/sdapi/v1/txt2img", self._txt2img, methods=["POST"]),
            Route("/sdapi/v1/img2img", self._img2img, methods=["POST"]),
            Route("/sdapi/v1/sd-models", self._sd_models, methods=["GET"]),
            Route("/sdapi/v1/samplers", self._samplers, methods=["GET"]),
            Route("/sdapi/v1/options", self._options, methods=["GET"]),
            Route("/sdapi/v1/interrupt", self._interrupt_api, methods=["POST"]),
            Route("/internal/progress", self._progress, methods=["POST"]),
        ])

    # -- control -------------------------------------------------------------------------------
    def behave(self, *, mode: str = "ok", fail_status: int | None = None, fail_times: int = 1_000_000,
               error_body: dict[str, Any] | None = None, retry_after: str | None = None, delay_s: float = 0.0,
               extra_images: int = 0, grid: bool = False, discovery_status: int | None = None) -> None:
        """mode: ok | garbage (HTML at 200) | info_not_json | no_images | no_info | not_image (base64 of
        text) | bad_base64 | few_images. fail_status: 500 (OOM text), 429, 422 (FastAPI body), or any with
        `error_body`. extra_images: maps appended after the batch; grid: a grid image first.
        discovery_status: /sd-models and /samplers answer this status (404: a server without them)."""
        self.mode, self.fail_status, self.fail_times = mode, fail_status, fail_times
        self.error_body, self.retry_after, self.delay_s = error_body, retry_after, delay_s
        self.extra_images, self.grid, self.discovery_status = extra_images, grid, discovery_status

    def reset(self) -> None:
        self.behave()
        self.requests.clear()
        self.interrupted.clear()

    @property
    def generations(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith(("/txt2img", "/img2img"))]

    @property
    def last(self) -> Recorded:
        return self.generations[-1]

    # -- plumbing ------------------------------------------------------------------------------
    def _denied(self, request: Request) -> Response | None:
        if self.credentials is None:
            return None
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            return a1111_error(401, "Not authenticated")
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        if (user, password) != self.credentials:
            return a1111_error(401, "Incorrect username or password")
        return None

    async def _enter(self, request: Request) -> tuple[Any, Response | None]:
        """Auth, record, parse: what every /sdapi handler does first."""
        body = None
        if request.method == "POST":
            raw = await request.body()
            body = orjson.loads(raw) if raw else None
        self.requests.append(Recorded(request.url.path, dict(request.headers), body))
        return body, self._denied(request)

    def _failure(self) -> Response | None:
        if not self.fail_status or self.fail_times <= 0:
            return None
        self.fail_times -= 1
        if self.error_body is not None:
            return JSONResponse(self.error_body, status_code=self.fail_status)
        if self.fail_status == 429:
            return JSONResponse({"detail": "Too Many Requests"}, status_code=429,
                                headers={"retry-after": self.retry_after or "3"})
        if self.fail_status == 422:
            return JSONResponse(VALIDATION_422, status_code=422)
        if self.fail_status >= 500:
            return a1111_error(self.fail_status, "", OOM)
        return a1111_error(self.fail_status, f"fake failure {self.fail_status}")

    def _validation(self, body: dict[str, Any]) -> Response | None:
        for name in _INT_FIELDS + _FLOAT_FIELDS:
            value = body.get(name)
            wanted = int if name in _INT_FIELDS else (int, float)
            if value is not None and (isinstance(value, bool) or not isinstance(value, wanted)):
                kind = "integer" if name in _INT_FIELDS else "float"
                return JSONResponse({"detail": [{"loc": ["body", name], "msg": f"value is not a valid {kind}",
                                                 "type": f"type_error.{kind}"}]}, status_code=422)
        return None

    async def _run(self, body: dict[str, Any], make: Any) -> Response:
        """Queue behind the lock like A1111, honour delay and /interrupt, then answer."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        task = body.get("force_task_id") or f"task(fake-{random.randrange(10**7)})"
        self._pending.add(task)
        async with self._lock:
            self._pending.discard(task)
            self._current, self._interrupt = task, False
            try:
                deadline = time.monotonic() + self.delay_s
                while time.monotonic() < deadline and not self._interrupt:
                    await asyncio.sleep(0.01)
                if (failed := self._failure()) is not None:
                    return failed
                return self._answer(body, make)
            finally:
                self._current = None

    def _answer(self, body: dict[str, Any], make: Any) -> Response:
        if self.mode == "garbage":
            return Response(b"<html><body>Internal Server Error</body></html>", media_type="text/html")
        width, height, n = body.get("width", 512), body.get("height", 512), body.get("batch_size", 1)
        seed = body.get("seed", -1)
        seed = random.randrange(2**32 - 1) if seed == -1 else seed
        images = [make(width, height, seed + i) for i in range(n)]
        first = 0
        if self.grid:
            images.insert(0, png(Image.new("RGB", (width * n, height), GRID_COLOR)))
            first = 1
        images += [png(Image.new("L", (64, 64), 128 + i)) for i in range(self.extra_images)]
        encoded = [base64.b64encode(data).decode() for data in images]
        if self.mode == "not_image":
            encoded = [base64.b64encode(b"this is not an image").decode()] * len(encoded)
        elif self.mode == "bad_base64":
            encoded = ["%%%not base64%%%"] * len(encoded)
        elif self.mode == "few_images":
            encoded = encoded[:first + n - 1]
        info = self._info(body, seed, n, first)
        answer: dict[str, Any] = {"images": encoded, "parameters": body, "info": orjson.dumps(info).decode()}
        if self.mode == "info_not_json":
            answer["info"] = "Steps: 20, Sampler: Euler a, Seed: 1"
        elif self.mode == "no_images":
            del answer["images"]
        elif self.mode == "no_info":
            del answer["info"]
        return Response(orjson.dumps(answer), media_type="application/json")

    def _info(self, body: dict[str, Any], seed: int, n: int, first: int) -> dict[str, Any]:
        wanted = (body.get("override_settings") or {}).get("sd_model_checkpoint")
        # Like A1111: an unknown checkpoint is dropped and the loaded model used; same for samplers.
        match = next((c for c in self.checkpoints if wanted in (c["title"], c["model_name"])), None)
        if match is not None:
            self.loaded = match["title"]
        sampler = body.get("sampler_name")
        sampler = sampler if any(s["name"] == sampler for s in SAMPLERS) else SAMPLERS[0]["name"]
        prompt = body.get("prompt", "")
        return {"prompt": prompt, "all_prompts": [prompt] * n, "negative_prompt": body.get("negative_prompt", ""),
                "seed": seed, "all_seeds": [seed + i for i in range(n)], "subseed": -1,
                "all_subseeds": [-1] * n, "width": body.get("width"), "height": body.get("height"),
                "sampler_name": sampler, "cfg_scale": body.get("cfg_scale"), "steps": body.get("steps"),
                "batch_size": n, "sd_model_name": self.loaded.split(" [")[0].rsplit(".", 1)[0],
                "denoising_strength": body.get("denoising_strength"), "index_of_first_image": first,
                "infotexts": [f"{prompt}\nSteps: {body.get('steps')}, Seed: {seed + i}" for i in range(n)],
                "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "version": "v1.10.1"}

    # -- handlers ------------------------------------------------------------------------------
    async def _txt2img(self, request: Request) -> Response:
        body, denied = await self._enter(request)
        if denied is not None:
            return denied
        if (invalid := self._validation(body)) is not None:
            return invalid

        def make(width: int, height: int, seed: int) -> bytes:
            return png(Image.new("RGB", (width, height), seed_color(seed)))

        return await self._run(body, make)

    async def _img2img(self, request: Request) -> Response:
        body, denied = await self._enter(request)
        if denied is not None:
            return denied
        if (invalid := self._validation(body)) is not None:
            return invalid
        if not body.get("init_images"):
            return a1111_error(404, "Init image not found")
        try:
            init = Image.open(io.BytesIO(base64.b64decode(body["init_images"][0], validate=True))).convert("RGB")
            size = (body.get("width", 512), body.get("height", 512))
            mask = edit_mask(body["mask"], size) if body.get("mask") else None
        except Exception:
            return a1111_error(500, "Invalid encoded image")

        def make(width: int, height: int, seed: int) -> bytes:
            out = init.resize((width, height))
            if mask is not None:
                out.paste(PAINT, (0, 0, width, height), mask)
            return png(out)

        return await self._run(body, make)

    async def _discovery(self, request: Request, answer: Any) -> Response:
        _, denied = await self._enter(request)
        if denied is not None:
            return denied
        if self.discovery_status == 404:
            return JSONResponse({"detail": "Not Found"}, status_code=404)  # FastAPI's unknown route
        if self.discovery_status:
            return a1111_error(self.discovery_status, "", "RuntimeError: busy")
        return JSONResponse(answer)

    async def _sd_models(self, request: Request) -> Response:
        return await self._discovery(request, self.checkpoints)

    async def _samplers(self, request: Request) -> Response:
        return await self._discovery(request, SAMPLERS)

    async def _options(self, request: Request) -> Response:
        _, denied = await self._enter(request)
        return denied or JSONResponse({"sd_model_checkpoint": self.loaded, "samples_format": "png",
                                       "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"})

    async def _interrupt_api(self, request: Request) -> Response:
        _, denied = await self._enter(request)
        if denied is not None:
            return denied
        if self._current is not None:
            self.interrupted.append(self._current)
            self._interrupt = True
        return JSONResponse({})

    async def _progress(self, request: Request) -> Response:
        # A gradio route in A1111: not behind --api-auth.
        body, _ = await self._enter(request)
        task = (body or {}).get("id_task")
        active = task is not None and task == self._current
        return JSONResponse({"active": active, "queued": task in self._pending, "completed": False,
                             "progress": 0.5 if active else None, "eta": None, "live_preview": None,
                             "id_live_preview": -1, "textinfo": "Waiting..." if not active else None})
