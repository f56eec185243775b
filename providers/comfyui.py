"""`comfyui`: ComfyUI servers as backends, driven by the operator's own API-format workflows.

A route names a workflow (and optionally one for edits); the request's fields are written into the
graph at the places the workflow maps (comfyui_workflows.py), the prompt is submitted with our own
client id and prompt id, its events come over the instance's one socket (comfyui_events.py) with
/history polled when the socket is quiet, and only the mapped output nodes are read back. A cancel
removes our prompt from the queue and interrupts it only if it is ours that runs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import anyio
import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import http
from .base import GeneratedImage, ImageRequest, ProviderResult, UpstreamError
from .comfyui_events import EventSocket, Outcome, Waiter
from .comfyui_workflows import CHOSEN, Workflow, comfy_sampler, comfy_scheduler, object_info_problems
from .imaging import white_edit_mask
from .options import HTTPProviderOptions
from .remote import HTTPProvider

log = logging.getLogger("imagegate")
CANCEL_TIMEOUT_S = 5.0
# ComfyUI writes /history just after the end event (milliseconds): poll for it, up to 10 s.
HISTORY_POLL_S, HISTORY_POLLS = 0.05, 200


class ComfyUIOptions(HTTPProviderOptions):
    base_url: str = "http://127.0.0.1:8188"
    max_concurrency: int = Field(default=1, ge=1)  # ComfyUI runs one prompt at a time per process
    workflows: dict[str, Workflow] = Field(default_factory=dict)
    upload_subfolder: str = "imagegate"  # our uploads go here (the API cannot delete them)
    quiet_s: float = Field(default=3.0, gt=0)  # no event for this long: look at /history instead
    check_object_info: bool = True


class RouteOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    workflow: str
    edit_workflow: str | None = None


def _misconfigured(message: str) -> UpstreamError:
    return UpstreamError(message, status=502, code="upstream_misconfigured", fallback=True)


class ComfyUIProvider(HTTPProvider):
    kind = "comfyui"
    honours = frozenset({"negative_prompt", "steps", "guidance_scale"})
    capabilities = frozenset({"generate", "edit", "inpaint"})
    Options = ComfyUIOptions
    options: ComfyUIOptions
    requires_api_key = False  # ComfyUI has no auth of its own; a proxy in front may want a bearer

    def __init__(self, name: str, options: ComfyUIOptions) -> None:
        super().__init__(name, options)
        self.client_id = uuid.uuid4().hex
        self.events: EventSocket | None = None
        self._checked: set[str] = set()

    def auth_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.options.api_key}"} if self.options.api_key else {}

    async def start(self) -> None:
        await super().start()
        scheme = "wss" if self.base.startswith("https") else "ws"
        url = f"{scheme}{self.base.removeprefix('https').removeprefix('http')}/ws?clientId={self.client_id}"
        self.events = EventSocket(url, self.auth_headers())
        self.events.start()

    async def aclose(self) -> None:
        if self.events is not None:
            await self.events.close()
        await super().aclose()

    def report(self) -> dict[str, Any]:
        if self.events is None:
            return {}
        step = self.events.progress
        return {"socket": "connected" if self.events.connected else "down",
                "server_queue": self.events.queue_remaining,
                "progress": round(step[0] / step[1], 3) if step and step[1] else None}

    # -- which workflow --------------------------------------------------------------------------
    def _workflow(self, request: ImageRequest) -> Workflow:
        try:
            route = RouteOptions.model_validate(request.route_options)
        except ValidationError:
            raise _misconfigured(f"routes to provider '{self.name}' need a `workflow:`") from None
        name = route.edit_workflow if request.operation == "edit" else route.workflow
        workflow = self.options.workflows.get(name or "")
        if workflow is None:
            raise _misconfigured(f"provider '{self.name}' has no workflow '{name}'")
        return workflow

    def unsupported(self, request: ImageRequest) -> str | None:
        if request.operation == "edit" and not request.route_options.get("edit_workflow"):
            return "the route names no edit_workflow"
        try:
            workflow = self._workflow(request)
        except UpstreamError:
            return None  # a configuration mistake: answered as such when the route is tried
        if request.operation == "edit" and not workflow.mapped("image"):
            return "the edit workflow maps no image"
        if request.mask is not None and not workflow.mapped("mask"):
            return "the edit workflow takes no mask"
        if len(request.images) > 1:
            return "the workflow takes one input image"
        if request.n > 1 and not workflow.mapped("n"):
            return "the workflow maps no batch size (n)"
        return None

    async def _check_server(self, workflow: Workflow) -> None:
        """At first contact, the mapping against the server's own node classes."""
        if not self.options.check_object_info or workflow.file in self._checked:
            return
        info = await self.call("GET", f"{self.base}/object_info")
        problems = object_info_problems(workflow, info if isinstance(info, dict) else {})
        if problems:
            raise _misconfigured(f"workflow {workflow.file} does not fit the server: {problems[0]}")
        self._checked.add(workflow.file)

    # -- the call ----------------------------------------------------------------------------------
    async def run(self, request: ImageRequest) -> ProviderResult:
        workflow = self._workflow(request)
        await self._check_server(workflow)
        graph = workflow.filled(await self._values(request, workflow))
        prompt_id = str(uuid.uuid4())  # ours: a retry of the same call is recognisable upstream
        assert self.events is not None, "provider not started"
        waiter = self.events.expect(prompt_id, Waiter(request.on_progress, _previews(request),
                                                  preview_size=(request.width, request.height)))
        try:
            await self._submit(graph, prompt_id, workflow)
            outcome = await self._wait(prompt_id, waiter)
            return ProviderResult(images=await self._outputs(prompt_id, workflow, request, outcome),
                                  metadata={"prompt_id": prompt_id})
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_TIMEOUT_S):
                await self._cancel(prompt_id)
            raise
        finally:
            self.events.forget(prompt_id)
            with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_TIMEOUT_S):
                await self._quietly("POST", "/history", {"delete": [prompt_id]})

    async def _values(self, request: ImageRequest, workflow: Workflow) -> dict[str, Any]:
        sampler, scheduler = self._sampling(request)
        values: dict[str, Any] = {
            "prompt": request.prompt, "negative_prompt": request.negative_prompt or "", "seed": request.seed,
            "width": request.width, "height": request.height, "n": request.n,
            "checkpoint": request.upstream_model, "steps": request.steps, "guidance_scale": request.guidance_scale,
            "strength": request.strength, "sampler": sampler, "scheduler": scheduler,
        }
        if request.images and workflow.mapped("image"):
            values["image"] = await self._upload(request.images[0].data, request.images[0].format)
        if request.mask is not None and workflow.mapped("mask"):
            values["mask"] = await self._upload(self._mask_for(workflow, request.mask.data), "png")
        return {k: v for k, v in values.items() if v is not None}

    @staticmethod
    def _sampling(request: ImageRequest) -> tuple[str | None, str | None]:
        """The request's sampler and scheduler, else the route's, in ComfyUI's names; "DPM++ 2M Karras"
        brings its scheduler unless one is asked for."""
        raw_sampler = request.tuning.get("sampler") or request.route_options.get("sampler")
        sampler, implied = comfy_sampler(raw_sampler) if isinstance(raw_sampler, str) else (None, None)
        raw_scheduler = request.tuning.get("scheduler")
        asked = comfy_scheduler(raw_scheduler) if isinstance(raw_scheduler, str) else None
        route = request.route_options.get("scheduler")
        return sampler, asked or implied or (route if isinstance(route, str) else None)

    @staticmethod
    def _mask_for(workflow: Workflow, mask: bytes) -> bytes:
        """OpenAI's mask (transparent = edit) as the mask node reads it: a LoadImage's MASK output and a
        LoadImageMask on the alpha channel take it as it is (ComfyUI inverts alpha); a LoadImageMask on a
        colour channel wants white = edit."""
        node = workflow.graph[workflow.inputs["mask"][0].node]
        channel = node["inputs"].get("channel", "alpha")
        return mask if node["class_type"] == "LoadImage" or channel == "alpha" else white_edit_mask(mask)

    async def _upload(self, data: bytes, fmt: str) -> str:
        name = f"imagegate-{uuid.uuid4().hex}.{fmt}"
        answer = await self.call("POST", f"{self.base}/upload/image", files={"image": (name, data, f"image/{fmt}")},
                                 data={"type": "input", "subfolder": self.options.upload_subfolder,
                                       "overwrite": "true"})
        if not isinstance(answer, dict) or not isinstance(answer.get("name"), str):
            raise http.bad_response("the upload answer has no name")
        folder = answer.get("subfolder") or ""
        return f"{folder}/{answer['name']}" if folder else str(answer["name"])

    async def _submit(self, graph: dict[str, Any], prompt_id: str, workflow: Workflow) -> None:
        response = await self.send("POST", f"{self.base}/prompt",
                                   json={"prompt": graph, "client_id": self.client_id, "prompt_id": prompt_id})
        if response.status_code == 400:
            raise self._refusal(http.parse_json(response), workflow)
        if response.status_code >= 300:
            raise self.error(response)

    def _refusal(self, body: Any, workflow: Workflow) -> UpstreamError:
        """A refused graph: a value the client chose that the node does not take (out of range, a sampler
        it lacks) is the request's (400, naming the node and input); anything else — a missing checkpoint,
        model file or node class, a constant of the workflow's own — is the configuration's (502, falls
        back). When both, the configuration's comes first: the next route may take the request."""
        error = body.get("error", {}) if isinstance(body, dict) else {}
        node_errors = body.get("node_errors", {}) if isinstance(body, dict) else {}
        rejected = None
        for node_id, found in node_errors.items() if isinstance(node_errors, dict) else []:
            for item in found.get("errors", []) if isinstance(found, dict) else []:
                name = (item.get("extra_info") or {}).get("input_name")
                where = f"node {node_id} ({found.get('class_type', '?')}) input {name}"
                message = self.clean(item.get("details") or item.get("message") or "refused")
                if workflow.field_at(str(node_id), str(name)) not in CHOSEN:
                    return _misconfigured(f"the server refused the workflow: {where}: {message}")
                rejected = rejected or UpstreamError(f"the server refused the request: {where}: {message}",
                                                     status=400, code="upstream_rejected", param=f"{node_id}.{name}")
        return rejected or _misconfigured(
            f"the server refused the workflow: {self.clean(error.get('message', 'invalid'))}")

    async def _wait(self, prompt_id: str, waiter: Waiter) -> Outcome:
        """The prompt's end from the socket; when it is quiet (or down), from /history."""
        while True:
            with anyio.move_on_after(self.options.quiet_s):
                return await asyncio.shield(waiter.ended)  # a quiet spell must not cancel the future itself
            history = await self._history(prompt_id)
            status = history.get("status", {}) if history else {}
            if status.get("completed") or status.get("status_str") in ("success", "error"):
                return _from_history(status)

    async def _written_history(self, prompt_id: str) -> dict[str, Any]:
        """The prompt's /history entry, polled for the moment ComfyUI writes it after the end event."""
        for _ in range(HISTORY_POLLS):
            if (history := await self._history(prompt_id)).get("status"):
                return history
            await anyio.sleep(HISTORY_POLL_S)
        return {}

    async def _history(self, prompt_id: str) -> dict[str, Any]:
        answer = await self.call("GET", f"{self.base}/history/{prompt_id}")
        found = answer.get(prompt_id) if isinstance(answer, dict) else None
        return found if isinstance(found, dict) else {}

    async def _outputs(self, prompt_id: str, workflow: Workflow, request: ImageRequest,
                       outcome: Outcome) -> list[GeneratedImage]:
        if outcome.status == "interrupted":
            raise UpstreamError("the prompt was interrupted on the server", status=502, code="upstream_interrupted",
                                fallback=True)
        if outcome.status == "error":
            raise self._execution_error(outcome.error)
        files = [image for node in workflow.outputs for image in outcome.outputs.get(node) or []]
        if not files:  # no `executed` event seen for them (the socket dropped): /history, once written
            history = await self._written_history(prompt_id)
            files = [image for node in workflow.outputs
                     for image in (history.get("outputs", {}).get(node, {}).get("images") or [])]
        if not files:
            raise UpstreamError("the workflow's output nodes gave no images", status=502, code="upstream_no_image",
                                fallback=True)
        images = []
        for index, file in enumerate(files[: request.n]):
            response = await self.send("GET", f"{self.base}/view", params={
                "filename": file.get("filename", ""), "subfolder": file.get("subfolder", ""),
                "type": file.get("type", "output")})
            if response.status_code != 200:
                raise self.error(response)
            images.append(GeneratedImage(data=response.content, seed=request.seed_for(index)))
        return images

    def _execution_error(self, data: dict[str, Any]) -> UpstreamError:
        kind, message = str(data.get("exception_type", "")), str(data.get("exception_message", ""))
        where = f"node {data.get('node_id', '?')} ({data.get('node_type', '?')})"
        if "outofmemory" in f"{kind} {message}".lower().replace(" ", ""):
            return UpstreamError(f"the server ran out of memory at {where}", status=503,
                                 code="upstream_out_of_memory", retryable=True, retry_after=10)
        return UpstreamError(f"the workflow failed at {where}: {self.clean(message, 300)}", status=502,
                             code="upstream_execution_failed", fallback=True)

    async def _cancel(self, prompt_id: str) -> None:
        """Take our prompt out of the queue, and interrupt it if it is the one running: only ours."""
        await self._quietly("POST", "/queue", {"delete": [prompt_id]})
        await self._quietly("POST", "/interrupt", {"prompt_id": prompt_id})

    async def _quietly(self, method: str, path: str, body: dict[str, Any]) -> None:
        try:
            await self.send(method, f"{self.base}{path}", json=body)
        except (UpstreamError, httpx.HTTPError) as exc:
            log.debug("comfyui %s %s: %s", method, path, exc)


def _previews(request: ImageRequest) -> Any:
    """Forward previews to a streaming client: at most partial_images of them, as they come."""
    if not request.partial_images or request.on_partial is None:
        return None
    sent = [0]
    on_partial = request.on_partial

    def forward(png: bytes) -> None:
        if sent[0] < request.partial_images:
            on_partial(sent[0], png)
            sent[0] += 1

    return forward


def _from_history(status: dict[str, Any]) -> Outcome:
    if status.get("status_str") == "error":
        return Outcome("error", _error_in({"status": status}))
    return Outcome("success")


def _error_in(history: dict[str, Any]) -> dict[str, Any]:
    """execution_error's data from a history entry's messages."""
    for message in history.get("status", {}).get("messages", []):
        if isinstance(message, list) and len(message) == 2 and message[0] == "execution_error":
            return dict(message[1]) if isinstance(message[1], dict) else {}
    return {}
