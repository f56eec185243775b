"""The one small interface every upstream kind implements.

A provider receives an `ImageRequest` that the router has already validated and normalized
(legal size, clamped steps, chosen seed) and returns the images as bytes. It knows nothing of
client HTTP requests, billing or keys.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Capability = Literal["generate", "edit", "inpaint", "multi-reference", "transparent"]
ALL_CAPABILITIES: tuple[Capability, ...] = ("generate", "edit", "inpaint", "multi-reference", "transparent")


@dataclass(frozen=True, slots=True)
class InputImage:
    """An input image already checked to be a real image of an allowed format."""

    data: bytes
    format: str  # "png" | "jpeg" | "webp"
    width: int
    height: int
    has_alpha: bool = False

    @property
    def content_type(self) -> str:
        return f"image/{self.format}"


@dataclass(slots=True)
class ImageRequest:
    """A validated, normalized request: everything an adapter needs, nothing it must re-check."""

    operation: Literal["generate", "edit"]
    prompt: str
    upstream_model: str
    width: int
    height: int
    n: int
    seed: int  # image i uses (seed + i) mod 2**32
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    quality: str | None = None
    output_format: str = "png"
    output_compression: int | None = None
    background: str | None = None
    images: list[InputImage] = field(default_factory=list)
    mask: InputImage | None = None
    strength: float | None = None
    # OpenAI fields some upstreams understand (user, safety_identifier, moderation, style, input_fidelity).
    hints: dict[str, Any] = field(default_factory=dict)
    # Sampler, scheduler and inpainting choices (A1111's names: sampler, scheduler, mask_blur,
    # inpainting_fill, inpaint_full_res, inpaint_full_res_padding, resize_mode): the kinds that can
    # honour them do, the others ignore them.
    tuning: dict[str, Any] = field(default_factory=dict)
    # Fields the client sent that the model's config lets through to the upstream as they are.
    extra: dict[str, Any] = field(default_factory=dict)
    # Per-route options from the YAML route entry (family, sampler, …), opaque to the router.
    route_options: dict[str, Any] = field(default_factory=dict)
    # Streaming: how many intermediate previews the client wants, and where to send them
    # (index, PNG bytes). Progress: (steps done, total). Called on the event loop; adapters that
    # cannot preview ignore them.
    partial_images: int = 0
    on_partial: Callable[[int, bytes], None] | None = None
    on_progress: Callable[[int, int], None] | None = None

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def seed_for(self, index: int) -> int:
        return (self.seed + index) % 2**32


@dataclass(slots=True)
class GeneratedImage:
    data: bytes
    seed: int | None = None
    # The upstream's own base64 of `data` (ASCII bytes, often a view into its answer), kept so an
    # unchanged image is passed through as it came, not re-encoded.
    b64: bytes | memoryview | None = None
    revised_prompt: str | None = None


@dataclass(slots=True)
class ProviderResult:
    images: list[GeneratedImage]
    metadata: dict[str, Any] = field(default_factory=dict)


class UpstreamError(Exception):
    """An upstream failed. `status` is what the client should see if no other route helps.

    `retryable`: the same route may succeed if tried again (timeouts, 429, 5xx).
    `fallback`: another route may succeed (also true for a broken upstream, false for a bad request).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        code: str = "upstream_error",
        retryable: bool = False,
        retry_after: float | None = None,
        param: str | None = None,
        fallback: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retryable = retryable
        self.retry_after = retry_after
        self.param = param
        # Whether another route may succeed where this one failed (a request error: no).
        self.fallback = retryable if fallback is None else fallback


class Provider(ABC):
    """Base class for adapters. Subclasses set `kind` and `capabilities` and implement `generate`."""

    kind: ClassVar[str] = ""
    capabilities: ClassVar[frozenset[str]] = frozenset({"generate"})
    # The request fields this kind can express upstream (the gateway does sizes, formats and seeds'
    # bookkeeping itself); a client is told the others are ignored.
    honours: ClassVar[frozenset[str]] = frozenset({"negative_prompt", "steps", "guidance_scale", "quality"})
    # The pydantic model that validates this kind's YAML options (a ProviderOptions subclass).
    Options: ClassVar[type[Any]]

    def __init__(self, name: str, options: Any) -> None:
        self.name = name
        self.options = options

    def missing_settings(self) -> list[str]:
        """Settings that are required but empty (e.g. an unset API key): the route is disabled."""
        return []

    def secrets(self) -> list[str]:
        """Values that must never appear in an error message or a log line."""
        return []

    def unsupported(self, request: ImageRequest) -> str | None:
        """Why this upstream cannot serve this request (its model family's size rules, too many
        reference images, …), or None. The router then skips the route without calling it."""
        return None

    def report(self) -> dict[str, Any]:
        """What this instance knows of its upstream beyond load and circuit (the admin view)."""
        return {}

    def bind_metrics(self, registry: Any) -> None:
        """The gateway's prometheus CollectorRegistry, for kinds that export metrics of their own."""

    async def start(self) -> None:
        """Open clients and pools. Called once when the gateway starts."""

    @abstractmethod
    async def generate(self, request: ImageRequest) -> ProviderResult:
        """Turn a validated request into `request.n` images."""

    async def aclose(self) -> None:
        """Release clients and pools."""
