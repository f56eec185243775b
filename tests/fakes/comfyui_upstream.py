"""A fake ComfyUI: HTTP and WebSocket on 127.0.0.1, following ComfyUI's server.py and execution.py
(docs/providers.md §9).

It validates each submitted API-format graph against a small /object_info (classes, INT ranges,
choice lists such as ckpt_name), runs one prompt at a time, sends `execution_start`, `progress`,
binary previews, `executed`, `execution_success` and `executing {node: null}` to the submitting
client's socket only, keeps /history, serves /view, accepts /upload/image, honours queue delete and
interrupt (of the named prompt only). Images are solid colours of the latent size (seed-coloured),
or for an inpaint the loaded image with the masked area painted `PAINT`. `behave(...)` misbehaves.
"""

from __future__ import annotations

import asyncio
import io
import random
from dataclasses import dataclass
from typing import Any

import orjson
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .server import FakeUpstream

PAINT = (255, 0, 255)
CHECKPOINTS = ["sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors"]
SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m"]
SCHEDULERS = ["normal", "karras", "exponential"]
INT = "INT"


def _spec(required: dict[str, Any]) -> dict[str, Any]:
    return {"input": {"required": required, "optional": {}}, "output": [], "name": ""}


OBJECT_INFO: dict[str, Any] = {
    "KSampler": _spec({"model": ["MODEL"], "seed": [INT, {"min": 0, "max": 2**64 - 1}],
                       "steps": [INT, {"min": 1, "max": 150}], "cfg": ["FLOAT", {"min": 0.0, "max": 100.0}],
                       "sampler_name": [SAMPLERS], "scheduler": [SCHEDULERS], "positive": ["CONDITIONING"],
                       "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
                       "denoise": ["FLOAT", {"min": 0.0, "max": 1.0}]}),
    "CheckpointLoaderSimple": _spec({"ckpt_name": [CHECKPOINTS]}),
    "EmptyLatentImage": _spec({"width": [INT, {"min": 16, "max": 4096}], "height": [INT, {"min": 16, "max": 4096}],
                               "batch_size": [INT, {"min": 1, "max": 8}]}),
    "CLIPTextEncode": _spec({"text": ["STRING"], "clip": ["CLIP"]}),
    "VAEDecode": _spec({"samples": ["LATENT"], "vae": ["VAE"]}),
    "SaveImage": _spec({"images": ["IMAGE"], "filename_prefix": ["STRING"]}),
    "LoadImage": _spec({"image": [[]]}),
    "LoadImageMask": _spec({"image": [[]], "channel": [["alpha", "red", "green", "blue"]]}),
    "VAEEncodeForInpaint": _spec({"pixels": ["IMAGE"], "vae": ["VAE"], "mask": ["MASK"],
                                  "grow_mask_by": [INT, {"min": 0, "max": 64}]}),
}


@dataclass
class Prompt:
    id: str
    client_id: str
    graph: dict[str, Any]
    status: str = "queued"  # queued | running | success | error | interrupted | deleted


@dataclass
class Behaviour:
    mode: str = "ok"  # ok | execution_error | oom | silent | drop
    step_delay_s: float = 0.0
    steps: int = 3
    previews: int = 2
    executed_events: bool = True  # False: as a socket that missed them (a reconnect mid-run)
    history_lag_s: float = 0.05  # ComfyUI writes /history after it sends execution_success


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def seed_color(seed: int) -> tuple[int, int, int]:
    return ((seed * 37) % 200 + 20, (seed * 91) % 200 + 20, (seed * 53) % 200 + 20)


class FakeComfyUI(FakeUpstream):
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.behaviour = Behaviour()
        self.prompts: dict[str, Prompt] = {}
        self.history: dict[str, Any] = {}
        self.files: dict[str, bytes] = {}  # "subfolder/name" → bytes (uploads and outputs)
        self.uploads: list[str] = []
        self.sockets: dict[str, WebSocket] = {}
        self.interrupts: list[dict[str, Any]] = []
        self.queue_deletes: list[str] = []
        self.history_deletes: list[str] = []
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self._queue: asyncio.Queue[str] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._interrupted: set[str] = set()
        self.running: str | None = None
        self.app = Starlette(routes=[
            Route("/prompt", self._prompt, methods=["POST"]),
            Route("/history/{prompt_id}", self._history_of, methods=["GET"]),
            Route("/history", self._history_delete, methods=["POST"]),
            Route("/view", self._view, methods=["GET"]),
            Route("/upload/image", self._upload, methods=["POST"]),
            Route("/queue", self._queue_delete, methods=["POST"]),
            Route("/interrupt", self._interrupt, methods=["POST"]),
            Route("/object_info", self._object_info, methods=["GET"]),
            WebSocketRoute("/ws", self._socket),
        ])

    def behave(self, **changes: Any) -> None:
        self.behaviour = Behaviour(**changes)

    def reset(self) -> None:
        self.behave()
        for log in (self.uploads, self.interrupts, self.queue_deletes, self.history_deletes, self.requests):
            log.clear()
        self.prompts.clear()
        self.history.clear()

    @property
    def graphs(self) -> list[dict[str, Any]]:
        return [p.graph for p in self.prompts.values()]

    # -- HTTP ----------------------------------------------------------------------------------------
    def _denied(self, request: Request) -> Response | None:
        self.requests.append((request.method, request.url.path))
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
            return Response("Unauthorized", status_code=401)
        return None

    async def _object_info(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        info = orjson.loads(orjson.dumps(OBJECT_INFO))
        uploaded = sorted(self.files)
        info["LoadImage"]["input"]["required"]["image"] = [uploaded]
        info["LoadImageMask"]["input"]["required"]["image"] = [uploaded]
        return JSONResponse(info)

    async def _prompt(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        body = orjson.loads(await request.body())
        graph, client_id = body.get("prompt"), body.get("client_id", "")
        refusal = self._validate(graph)
        if refusal is not None:
            return JSONResponse(refusal, status_code=400)
        prompt_id = body.get("prompt_id") or f"{random.getrandbits(64):016x}"
        self.prompts[prompt_id] = Prompt(prompt_id, client_id, graph)
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._work())
        await self._queue.put(prompt_id)
        await self._broadcast_status()
        return JSONResponse({"prompt_id": prompt_id, "number": len(self.prompts), "node_errors": {}})

    def _validate(self, graph: Any) -> dict[str, Any] | None:
        node_errors: dict[str, Any] = {}
        for node_id, node in graph.items():
            spec = OBJECT_INFO.get(node.get("class_type"))
            if spec is None:
                return {"error": {"type": "invalid_prompt", "message": f"Cannot execute because node "
                                  f"{node.get('class_type')} does not exist.", "details": "", "extra_info": {}},
                        "node_errors": {}}
            for name, (kind, *rest) in spec["input"]["required"].items():
                value = node["inputs"].get(name)
                error = self._check_value(name, kind, rest[0] if rest else {}, value)
                if error is not None:
                    node_errors.setdefault(node_id, {"errors": [], "dependent_outputs": ["9"],
                                                     "class_type": node["class_type"]})["errors"].append(error)
        if node_errors:
            return {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed "
                              "validation", "details": "", "extra_info": {}}, "node_errors": node_errors}
        if not any(n["class_type"] == "SaveImage" for n in graph.values()):
            return {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                              "extra_info": {}}, "node_errors": {}}
        return None

    def _check_value(self, name: str, kind: Any, limits: dict[str, Any], value: Any) -> dict[str, Any] | None:
        if isinstance(kind, list):  # a choice list
            choices = sorted(self.files) if name == "image" else kind
            if value not in choices:
                return {"type": "value_not_in_list", "message": "Value not in list",
                        "details": f"{name}: '{value}' not in {choices}", "extra_info": {"input_name": name}}
        elif kind == INT and isinstance(value, int):
            if value > limits.get("max", value):
                return {"type": "value_bigger_than_max", "message": "Value bigger than max",
                        "details": f"{name}: {value} > {limits['max']}", "extra_info": {"input_name": name}}
            if value < limits.get("min", value):
                return {"type": "value_smaller_than_min", "message": "Value smaller than min",
                        "details": f"{name}: {value} < {limits['min']}", "extra_info": {"input_name": name}}
        return None

    async def _history_of(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        prompt_id = request.path_params["prompt_id"]
        return JSONResponse({prompt_id: self.history[prompt_id]} if prompt_id in self.history else {})

    async def _history_delete(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        for prompt_id in orjson.loads(await request.body()).get("delete", []):
            self.history_deletes.append(prompt_id)
            self.history.pop(prompt_id, None)
        return Response(status_code=200)

    async def _view(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        q = request.query_params
        key = f"{q.get('subfolder')}/{q.get('filename')}" if q.get("subfolder") else str(q.get("filename"))
        if key not in self.files:
            return Response(status_code=404)
        return Response(self.files[key], media_type="image/png")

    async def _upload(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        form = await request.form()
        upload, folder = form["image"], str(form.get("subfolder", ""))
        assert not isinstance(upload, str)
        name = str(upload.filename)
        key = f"{folder}/{name}" if folder else name
        self.files[key] = await upload.read()
        self.uploads.append(key)
        return JSONResponse({"name": name, "subfolder": folder, "type": "input"})

    async def _queue_delete(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        for prompt_id in orjson.loads(await request.body()).get("delete", []):
            self.queue_deletes.append(prompt_id)
            prompt = self.prompts.get(prompt_id)
            if prompt is not None and prompt.status == "queued":
                prompt.status = "deleted"
        return Response(status_code=200)

    async def _interrupt(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        raw = await request.body()
        body = orjson.loads(raw) if raw else {}
        self.interrupts.append(body)
        target = body.get("prompt_id")
        if self.running is not None and target in (None, self.running):  # ComfyUI: only the named one
            self._interrupted.add(self.running)
        return Response(status_code=200)

    # -- the socket and the worker ---------------------------------------------------------------
    async def _socket(self, socket: WebSocket) -> None:
        client_id = socket.query_params.get("clientId", "")
        await socket.accept()
        self.sockets[client_id] = socket
        await socket.send_text(self._status({"sid": client_id}))
        try:
            while True:
                await socket.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            if self.sockets.get(client_id) is socket:
                del self.sockets[client_id]

    def _status(self, extra: dict[str, Any]) -> str:
        remaining = sum(p.status in ("queued", "running") for p in self.prompts.values())
        return orjson.dumps({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}},
                                                        **extra}}).decode()

    async def _broadcast_status(self) -> None:
        """ComfyUI tells every client the queue's length whenever it changes."""
        for socket in list(self.sockets.values()):
            try:
                await socket.send_text(self._status({}))
            except Exception:
                pass

    async def _send(self, prompt: Prompt, kind: str, data: dict[str, Any]) -> None:
        socket = self.sockets.get(prompt.client_id)
        if socket is None or self.behaviour.mode == "silent":
            return
        try:
            await socket.send_text(orjson.dumps({"type": kind, "data": {**data, "prompt_id": prompt.id}}).decode())
        except Exception:
            pass

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            prompt = self.prompts[await self._queue.get()]
            if prompt.status != "queued":
                continue
            self.running, prompt.status = prompt.id, "running"
            try:
                await self._execute(prompt)
            finally:
                self.running = None
                await self._broadcast_status()

    async def _execute(self, prompt: Prompt) -> None:
        b = self.behaviour
        await self._send(prompt, "execution_start", {"timestamp": 0})
        for step in range(1, b.steps + 1):
            await asyncio.sleep(b.step_delay_s)
            if prompt.id in self._interrupted:
                prompt.status = "interrupted"
                await self._send(prompt, "execution_interrupted", {"node_id": "3", "node_type": "KSampler"})
                self.history[prompt.id] = {"outputs": {}, "status": {"status_str": "error", "completed": False,
                                                                       "messages": []}}
                return
            await self._send(prompt, "progress", {"value": step, "max": b.steps, "node": "3"})
            if step <= b.previews:
                await self._preview(prompt, step)
            if b.mode == "drop" and step == 1 and (socket := self.sockets.get(prompt.client_id)) is not None:
                await socket.close()
        if b.mode in ("execution_error", "oom"):
            data = {"node_id": "3", "node_type": "KSampler", "exception_type": "RuntimeError",
                    "exception_message": "mat1 and mat2 shapes cannot be multiplied", "traceback": []}
            if b.mode == "oom":
                data.update(exception_type="torch.OutOfMemoryError",
                            exception_message="CUDA out of memory. Tried to allocate 2.00 GiB")
            prompt.status = "error"
            self.history[prompt.id] = {"outputs": {}, "status": {"status_str": "error", "completed": False,
                                                                   "messages": [["execution_error", data]]}}
            await self._send(prompt, "execution_error", data)
            return
        outputs = self._images(prompt)
        if b.executed_events:
            await self._send(prompt, "executed", {"node": "9", "output": {"images": outputs}})
        # ComfyUI's order (execution.py, then main.py's task_done): the end event, then /history.
        await self._send(prompt, "execution_success", {"timestamp": 0})
        await asyncio.sleep(b.history_lag_s)
        self.history[prompt.id] = {"outputs": {"9": {"images": outputs}},
                                   "status": {"status_str": "success", "completed": True, "messages": []}}
        prompt.status = "success"
        await self._send(prompt, "executing", {"node": None})

    async def _preview(self, prompt: Prompt, step: int) -> None:
        socket = self.sockets.get(prompt.client_id)
        if socket is None or self.behaviour.mode == "silent":
            return
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (step * 60, 0, 0)).save(buf, "JPEG")
        try:
            await socket.send_bytes((1).to_bytes(4, "big") + (1).to_bytes(4, "big") + buf.getvalue())
        except Exception:
            pass

    def _images(self, prompt: Prompt) -> list[dict[str, Any]]:
        graph = prompt.graph
        seed = graph["3"]["inputs"]["seed"]
        if "10" in graph:  # the inpaint workflow: the loaded image, its masked area painted
            base = Image.open(io.BytesIO(self.files[graph["10"]["inputs"]["image"]])).convert("RGB")
            mask = Image.open(io.BytesIO(self.files[graph["11"]["inputs"]["image"]])).convert("RGBA").getchannel("A")
            edit = mask.point(lambda a: 255 if a < 128 else 0)  # LoadImageMask(alpha): mask = 1 - alpha
            base.paste(PAINT, (0, 0, *base.size), edit)
            images = [base]
        else:
            latent = graph["5"]["inputs"]
            images = [Image.new("RGB", (latent["width"], latent["height"]), seed_color(seed + i))
                      for i in range(latent["batch_size"])]
        out = []
        for i, image in enumerate(images):
            name = f"imagegate_{prompt.id[:8]}_{i:05d}_.png"
            self.files[name] = _png(image)
            out.append({"filename": name, "subfolder": "", "type": "output"})
        return out
