"""Per-model rules: turn a parsed body into a normalized `ImageRequest`, or a 400 naming the field.

Everything here runs before any money is held or any upstream is called.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass

from imagegate.providers.base import ImageRequest

from ..config import ModelConfig, parse_size
from ..errors import ApiError, invalid
from .asks import ImageAsk, Inputs
from .pricing import Price

STEPS_MIN, STEPS_MAX = 1, 60
_RATIO = re.compile(r"^(\d{1,4}):(\d{1,4})$")


@dataclass(slots=True)
class Prepared:
    """A request ready for routing, plus how the client wants the answer."""

    model_id: str
    request: ImageRequest
    needs: set[str]
    response_format: str
    stream: bool
    partial_images: int
    price: Price  # of the whole request as asked: what is held before it runs
    inputs: Inputs  # the input images as given (request.images are the same), with their artifact ids
    keep_s: int | None = None  # the results' lifetime, when longer than the artifacts' default
    webhook_url: str | None = None  # an async task's callback, checked when it is submitted
    artifacts: bool = True  # the answer's images are kept as artifacts (see ImageAsk.artifacts)


def check_extra_fields(ask: ImageAsk, model: ModelConfig) -> dict[str, object]:
    extra = {k: v for k, v in ask.extra.items() if v is not None}
    if extra and not model.allow_extra_fields:
        name = sorted(extra)[0]
        raise invalid(f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
    return extra


def _check_legal(w: int, h: int, model: ModelConfig, param: str) -> None:
    lim = model.limits
    if model.sizes:
        if f"{w}x{h}" not in model.sizes:
            raise invalid(f"size {w}x{h} is not offered; choose one of {', '.join(model.sizes)} or auto", param)
        return
    for side in (w, h):
        if not lim.min_side <= side <= lim.max_side:
            raise invalid(f"each side must be between {lim.min_side} and {lim.max_side} pixels", param)
        if side % lim.multiple_of:
            raise invalid(f"each side must be a multiple of {lim.multiple_of} (got {w}x{h})", param)


def _is_legal(w: int, h: int, model: ModelConfig) -> bool:
    try:
        _check_legal(w, h, model, "size")
    except ApiError:
        return False
    return True


def _snap(value: float, model: ModelConfig) -> int:
    m = model.limits.multiple_of
    low = math.ceil(model.limits.min_side / m) * m
    high = math.floor(model.limits.max_side / m) * m
    return int(min(high, max(low, round(value / m) * m)))


def nearest_size(ratio: float, pixels: int, model: ModelConfig) -> tuple[int, int]:
    """The legal size with this aspect ratio closest to `pixels` in area."""
    if model.sizes:
        parsed = [parse_size(s) for s in model.sizes]
        return min((s for s in parsed if s),
                   key=lambda s: (abs(math.log(s[0] / s[1] / ratio)), abs(s[0] * s[1] - pixels)))
    h = math.sqrt(pixels / ratio)
    return _snap(h * ratio, model), _snap(h, model)


def _default_size(model: ModelConfig) -> tuple[int, int]:
    size = parse_size(model.default_size)
    assert size is not None  # checked when the config was loaded
    if model.sizes and model.default_size not in model.sizes:
        return parse_size(model.sizes[0]) or size
    return size


def resolve_size(ask: ImageAsk, model: ModelConfig, inputs: Inputs) -> tuple[int, int]:
    default = _default_size(model)
    if ask.size and ask.size != "auto":
        if ask.aspect_ratio:
            raise invalid("give either size or aspect_ratio, not both", "aspect_ratio")
        parsed = parse_size(ask.size)
        if parsed is None:
            raise invalid("size must be 'WIDTHxHEIGHT' (e.g. 1024x1024) or 'auto'", "size")
        _check_legal(*parsed, model, "size")
        return parsed
    if ask.aspect_ratio and ask.aspect_ratio != "auto":
        match = _RATIO.match(ask.aspect_ratio)
        if not match or int(match[1]) == 0 or int(match[2]) == 0:
            raise invalid("aspect_ratio must look like '16:9'", "aspect_ratio")
        ratio = int(match[1]) / int(match[2])
        if not 1 / 8 <= ratio <= 8:
            raise invalid("aspect_ratio must be between 1:8 and 8:1", "aspect_ratio")
        return nearest_size(ratio, default[0] * default[1], model)
    if inputs.images:
        first = inputs.images[0]
        if _is_legal(first.width, first.height, model):
            return first.width, first.height
        return nearest_size(first.width / first.height, first.width * first.height, model)
    return default


def _output_format(ask: ImageAsk) -> str:
    fmt = "jpeg" if ask.output_format == "jpg" else (ask.output_format or "png")
    if ask.background == "transparent" and fmt == "jpeg":
        raise invalid("a transparent background needs output_format png or webp", "background")
    if fmt == "png" and ask.output_compression not in (None, 100):
        raise invalid("output_compression applies to jpeg and webp only", "output_compression")
    return fmt


def _tuning(ask: ImageAsk, model: ModelConfig) -> tuple[int | None, float | None]:
    preset = model.quality.get(ask.quality or "")
    steps = ask.steps if ask.steps is not None else (preset and preset.steps) or model.defaults.steps
    guidance = ask.guidance_scale
    if guidance is None:
        guidance = (preset and preset.guidance_scale) or model.defaults.guidance_scale
    if steps is not None:
        steps = max(STEPS_MIN, min(STEPS_MAX, steps))
    return steps, guidance


def _needs(operation: str, ask: ImageAsk, inputs: Inputs) -> set[str]:
    needs = {operation}
    if inputs.mask is not None:
        needs.add("inpaint")
    if len(inputs.images) > 1:
        needs.add("multi-reference")
    if ask.background == "transparent":
        needs.add("transparent")
    return needs


def _check_prompt(ask: ImageAsk) -> str:
    if ask.prompt is None:
        raise invalid("prompt is required", "prompt", code="missing_required_parameter")
    if not ask.prompt.strip():
        raise invalid("prompt must not be empty", "prompt")
    return ask.prompt


def precheck(ask: ImageAsk, model_id: str, model: ModelConfig) -> None:
    """What can be checked before the input images are read (a URL input is fetched only for a
    request whose other fields hold): extra fields, prompt, n, an explicit size, the format."""
    check_extra_fields(ask, model)
    _check_prompt(ask)
    if (ask.n or 1) > model.limits.max_n:
        raise invalid(f"n must be between 1 and {model.limits.max_n} for model '{model_id}'", "n")
    if ask.size and ask.size != "auto":
        resolve_size(ask, model, Inputs())
    _output_format(ask)


def prepare(ask: ImageAsk, model_id: str, model: ModelConfig, operation: str, inputs: Inputs) -> Prepared:
    """Validate `ask` against the model and build the normalized request, priced."""
    extra = check_extra_fields(ask, model)
    prompt = _check_prompt(ask)
    n = ask.n or 1
    if n > model.limits.max_n:
        raise invalid(f"n must be between 1 and {model.limits.max_n} for model '{model_id}'", "n")
    if operation == "edit" and not inputs.images:
        raise invalid("an edit needs at least one image", "image", code="missing_required_parameter")
    width, height = resolve_size(ask, model, inputs)
    output_format = _output_format(ask)
    steps, guidance = _tuning(ask, model)
    strength = ask.strength
    if operation == "edit" and strength is None:
        strength = model.defaults.strength if model.defaults.strength is not None else 0.75
    request = ImageRequest(
        operation=operation,  # type: ignore[arg-type]
        prompt=prompt, upstream_model="", width=width, height=height, n=n,
        seed=ask.seed if ask.seed is not None else secrets.randbelow(2**32),
        steps=steps, guidance_scale=guidance,
        negative_prompt=ask.negative_prompt if ask.negative_prompt is not None else model.defaults.negative_prompt,
        quality=ask.quality, output_format=output_format, output_compression=ask.output_compression,
        background=ask.background, images=inputs.images, mask=inputs.mask, strength=strength,
        hints=ask.hints, tuning=ask.tuning, extra=extra,
        partial_images=ask.partial_images if ask.stream else ask.previews,
    )
    price = Price.for_request(model, model_id, operation, ask.quality, width, height, n)
    return Prepared(model_id=model_id, request=request, needs=_needs(operation, ask, inputs),
                    response_format=ask.response_format or "b64_json", stream=ask.stream,
                    partial_images=ask.partial_images, price=price, inputs=inputs, keep_s=ask.keep_s,
                    webhook_url=ask.webhook_url, artifacts=ask.artifacts)
