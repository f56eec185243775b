"""`diffusers`: models run on this host's GPU (or CPU) by the local backend, from weights on disk.

The provider turns a validated request into a `local_backend` Job and awaits the device worker.
Which model a route means: the route's `model:` names an entry of this provider's `models:`, or is
itself a path with the route option `family:` (and optionally the other ModelSpec fields).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field

from imagegate.local_backend.jobs import FAMILIES, Job, JobCancelled, ModelLoadError, ModelSpec, OutOfMemory, QueueFull

from .base import GeneratedImage, ImageRequest, Provider, ProviderResult, UpstreamError
from .options import ProviderOptions

log = logging.getLogger("imagegate")
# Route options that describe the model (everything else in a route entry is ignored here).
_SPEC_FIELDS = ("family", "config_dir", "dtype", "offload", "compile", "scheduler", "vae_tiling",
                "channels_last", "loras")
DEFAULT_STEPS = {"sd15": 30, "sdxl": 30, "flux": 28, "qwen-image": 30}


class LocalModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    family: Literal["sd15", "sdxl", "flux", "qwen-image"]
    path: str
    config_dir: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    offload: Literal["none", "model", "sequential"] = "none"
    compile: bool = False
    scheduler: str | None = None
    vae_tiling: bool | None = None
    channels_last: bool = False
    loras: dict[str, str] = Field(default_factory=dict)
    warmup: bool = False  # load at start instead of on first use

    def spec(self, name: str) -> ModelSpec:
        return ModelSpec(name=name, family=self.family, path=Path(self.path),
                         config_dir=Path(self.config_dir) if self.config_dir else None, dtype=self.dtype,
                         offload=self.offload, compile=self.compile, scheduler=self.scheduler,
                         vae_tiling=self.vae_tiling, channels_last=self.channels_last,
                         loras=tuple((k, Path(v)) for k, v in self.loras.items()))


class DiffusersOptions(ProviderOptions):
    device: str = "auto"  # "cuda:0", "cpu"; auto: the first GPU if there is one
    # None: the device's memory less 3 GB of working memory (CUDA), or half the RAM (CPU)
    memory_budget_gb: float | None = Field(default=None, gt=0)
    max_batch: int = Field(default=4, ge=1)  # images in one pipeline call when equal requests wait together
    models: dict[str, LocalModel] = Field(default_factory=dict)
    max_concurrency: int = Field(default=8, ge=1)  # requests handed to the worker (it runs one call at a time)


class DiffusersProvider(Provider):
    kind = "diffusers"
    honours = frozenset({"negative_prompt", "steps", "guidance_scale"})
    capabilities = frozenset({"generate", "edit", "inpaint"})
    Options = DiffusersOptions
    options: DiffusersOptions

    def __init__(self, name: str, options: DiffusersOptions) -> None:
        super().__init__(name, options)
        self.specs = {model: entry.spec(model) for model, entry in options.models.items()}
        self.worker: Any = None
        self._metrics_registry: Any = None

    def bind_metrics(self, registry: Any) -> None:
        self._metrics_registry = registry

    async def start(self) -> None:
        # torch and diffusers load here, only when a diffusers provider is configured.
        from imagegate.local_backend.metrics import BackendMetrics
        from imagegate.local_backend.worker import DeviceWorker

        metrics = BackendMetrics(self._metrics_registry) if self._metrics_registry is not None else None
        self.worker = DeviceWorker(self.options.device, memory_budget_gb=self.options.memory_budget_gb,
                                   max_queue=self.options.max_queue + self.options.max_concurrency,
                                   max_batch=self.options.max_batch, metrics=metrics)
        await self.worker.start()
        warm = [self.specs[m] for m, entry in self.options.models.items() if entry.warmup]
        if warm:
            try:
                await self.worker.warm(warm)
            except ModelLoadError as exc:  # the others serve; this one answers 503 model_load_failed
                log.error("provider %r: warm-up failed: %s", self.name, exc)

    async def aclose(self) -> None:
        if self.worker is not None:
            await self.worker.aclose()

    def spec_for(self, request: ImageRequest) -> ModelSpec | str:
        """The model a route means, or why it names none."""
        if request.upstream_model in self.specs:
            return self.specs[request.upstream_model]
        options = {k: v for k, v in request.route_options.items() if k in _SPEC_FIELDS}
        if options.get("family") not in FAMILIES:
            return (f"'{request.upstream_model}' is not in this provider's models: and the route has no "
                    f"family: ({', '.join(FAMILIES)})")
        try:
            return LocalModel(path=request.upstream_model, **options).spec(request.upstream_model)
        except ValueError as exc:
            return f"bad route options for '{request.upstream_model}': {exc}"

    def unsupported(self, request: ImageRequest) -> str | None:
        spec = self.spec_for(request)
        if isinstance(spec, str):
            return spec
        step = 8 if spec.family in ("sd15", "sdxl") else 16  # latents: VAE /8, and /2 packing for Flux/Qwen
        if request.width % step or request.height % step:
            return f"{spec.family} needs sides that are multiples of {step}"
        if len(request.images) > 1:
            return "local pipelines edit one image at a time"
        if request.background == "transparent":
            return "local pipelines make opaque images"
        return None

    async def generate(self, request: ImageRequest) -> ProviderResult:
        spec = self.spec_for(request)
        assert isinstance(spec, ModelSpec)  # `unsupported` ran first
        job = self._job(spec, request)
        try:
            with anyio.fail_after(self.options.timeout_s):  # queue wait and run: then the next route
                result = await self.worker.run(job)  # cancelling marks the job: it stops at its next step
        except TimeoutError:
            raise UpstreamError(f"the local job did not finish within {self.options.timeout_s:g} s", status=504,
                                code="upstream_timeout", retryable=True, fallback=True) from None
        except QueueFull as exc:
            raise UpstreamError("the local GPU queue is full", status=429, code="upstream_rate_limited",
                                retryable=True, retry_after=exc.retry_after) from None
        except OutOfMemory:
            raise UpstreamError("the GPU ran out of memory for this request", status=503, code="gpu_out_of_memory",
                                retryable=False, fallback=True, retry_after=10) from None
        except ModelLoadError as exc:
            raise UpstreamError(f"local model could not be loaded: {exc}", status=503, code="model_load_failed",
                                fallback=True, retry_after=30) from None
        except JobCancelled:
            raise UpstreamError("the generation was cancelled", status=499, code="cancelled") from None
        except ValueError as exc:  # the pipeline refused an input (an unknown LoRA name, say)
            raise UpstreamError(f"the local pipeline refused the request: {exc}", status=400,
                                code="upstream_rejected") from None
        except Exception as exc:  # e.g. torch.compile failing on first use: this route failed, not the gateway
            log.exception("provider %r: the local pipeline failed", self.name)
            raise UpstreamError(f"the local pipeline failed ({type(exc).__name__})", status=502,
                                code="local_pipeline_failed", fallback=True) from None
        images = [GeneratedImage(data=png, seed=seed) for png, seed in zip(result.images, result.seeds, strict=False)]
        return ProviderResult(images=images, metadata={"seconds": result.seconds})

    def _job(self, spec: ModelSpec, request: ImageRequest) -> Job:
        loop = asyncio.get_running_loop()

        def threadsafe(callback: Any) -> Any:
            # The worker calls back from its own thread; the request's callbacks live on the event loop.
            return None if callback is None else (lambda *args: loop.call_soon_threadsafe(callback, *args))

        lora = request.extra.get("lora") if isinstance(request.extra.get("lora"), str) else None
        return Job(spec=spec, operation=request.operation, prompt=request.prompt, width=request.width,
                   height=request.height, n=request.n, seed=request.seed,
                   steps=request.steps or DEFAULT_STEPS[spec.family], guidance_scale=request.guidance_scale,
                   negative_prompt=request.negative_prompt,
                   image=request.images[0].data if request.images else None,
                   mask=request.mask.data if request.mask else None,
                   strength=request.strength if request.strength is not None else 0.75, lora=lora,
                   partial_images=request.partial_images, on_progress=threadsafe(request.on_progress),
                   on_preview=threadsafe(request.on_partial))
