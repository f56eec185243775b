"""The AUTOMATIC1111 surface's request bodies: A1111's own field names and defaults.

Every field A1111 defines is accepted at its neutral value, because clients (webuiapi among them)
send the whole request model every time. A field A1111 does not have is a 422 naming it, and so
is a feature the gateway does not do (hires fix, scripts, face restoration…) when it is switched
on: a silent success would hand back something other than what was asked.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ApiError
from ..pipeline import ImageAsk

_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")
PREVIEWS = 2  # previews a local backend makes per request, for /sdapi/v1/progress's current_image


class FieldError(ApiError):
    """A bad field, as FastAPI reports one: 422 `{"detail": [{"loc", "msg", "type"}]}`."""

    def __init__(self, field: str, message: str, kind: str = "value_error") -> None:
        super().__init__(422, message, param=field, code=kind)


class Txt2ImgBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = Field(default=-1, ge=-1, le=2**32 - 1)
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # the old name of sampler_name
    scheduler: str | None = None
    batch_size: int = Field(default=1, ge=1)
    n_iter: int = Field(default=1, ge=1)
    # Unset: the model's defaults (its steps, guidance and size), not A1111's 50 steps at 512x512.
    steps: int | None = Field(default=None, ge=1)
    cfg_scale: float | None = Field(default=None, ge=0, le=100)
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = Field(default=None, ge=0, le=1)
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstphase_image: str | None = None
    comments: dict[str, Any] | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None
    model: str | None = None  # seed 004's field: the checkpoint, as override_settings names it

    def refusals(self) -> None:
        """A 422 for the first feature asked for that the gateway does not do."""
        off = {"enable_hr": (self.enable_hr, "hires fix (enable_hr) is not offered by this gateway"),
               "alwayson_scripts": (self.alwayson_scripts, "scripts (alwayson_scripts) are not offered"),
               "script_name": (self.script_name, "scripts (script_name) are not offered"),
               "script_args": (self.script_args, "scripts (script_args) are not offered"),
               "restore_faces": (self.restore_faces, "face restoration is not offered"),
               "tiling": (self.tiling, "tiling is not offered"),
               "subseed_strength": (self.subseed_strength, "variation seeds (subseed_strength) are not offered"),
               "refiner_checkpoint": (self.refiner_checkpoint, "refiner checkpoints are not offered"),
               "styles": (self.styles, "no prompt styles are defined on this gateway"),
               "infotext": (self.infotext, "infotext parameters are not read; send the fields"),
               "firstphase_image": (self.firstphase_image, "firstphase_image is not offered")}
        for field, (value, message) in off.items():
            if value:
                raise FieldError(field, message)

    @property
    def images_asked(self) -> int:
        return self.batch_size * self.n_iter

    def checkpoint(self) -> str | None:
        """The model this request names: override_settings, then `model`; titles lose their hash."""
        settings = self.override_settings or {}
        name = settings.get("sd_model_checkpoint") or self.model
        if name is not None and not isinstance(name, str):
            raise FieldError("override_settings", "sd_model_checkpoint must be a string")
        return strip_hash(name) if name else None

    def ask(self, model: str | None, strength: float | None = None) -> ImageAsk:
        sampler = self.sampler_name or self.sampler_index
        tuning = {k: v for k, v in (("sampler", sampler), ("scheduler", self.scheduler)) if v}
        return ImageAsk(
            prompt=self.prompt, model=model, n=self.images_asked, size=self.size(),
            output_format="png", negative_prompt=self.negative_prompt or None,
            seed=None if self.seed == -1 else self.seed, steps=self.steps, guidance_scale=self.cfg_scale,
            strength=strength, tuning=tuning | self.extra_tuning(), previews=PREVIEWS)

    def extra_tuning(self) -> dict[str, Any]:
        return {}

    def size(self) -> str | None:
        if self.width is None and self.height is None:
            return None
        if self.width is None or self.height is None:
            raise FieldError("width" if self.width is None else "height", "give both width and height, or neither")
        return f"{self.width}x{self.height}"


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] | None = None
    resize_mode: int = Field(default=0, ge=0, le=3)
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = Field(default=None, ge=0, le=64)
    mask_round: bool = True
    inpainting_fill: int = Field(default=0, ge=0, le=3)
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(default=0, ge=0)
    inpainting_mask_invert: int = Field(default=0, ge=0, le=1)
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False
    denoising_strength: float | None = Field(default=0.75, ge=0, le=1)

    def extra_tuning(self) -> dict[str, Any]:
        tuning: dict[str, Any] = {"resize_mode": self.resize_mode}
        if self.mask is not None:
            tuning.update(inpainting_fill=self.inpainting_fill, inpaint_full_res=self.inpaint_full_res,
                          inpaint_full_res_padding=self.inpaint_full_res_padding,
                          mask_blur=self.mask_blur if self.mask_blur is not None else self.mask_blur_x)
        return tuning


def strip_hash(title: str) -> str:
    """A1111's "name [hash]" checkpoint titles name the model before the hash."""
    return _TITLE_HASH.sub("", title.strip())


def parse(model: type[Txt2ImgBody], data: Any) -> Txt2ImgBody:
    if not isinstance(data, dict):
        raise FieldError("body", "the request body must be a JSON object", "type_error.dict")
    data = {k: v for k, v in data.items() if v is not None}
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        message = f"unknown field '{field}'" if first["type"] == "extra_forbidden" else first["msg"]
        raise FieldError(field, message, first["type"]) from None
    body.refusals()
    return body
