"""Loading a ModelSpec into a diffusers pipeline, and the per-operation views that share its weights.

Everything loads from local files only (`local_files_only=True`): a diffusers directory through the
family's pipeline class, or a single checkpoint file with a local config-only directory (without
`config=`, `from_single_file` goes to the Hub even offline; docs/local-diffusers.md §3.5).
img2img and inpainting are `AutoPipelineFor*.from_pipe` views of the loaded text-to-image pipeline:
the same module objects, no second copy of the weights.

All of this runs on the device worker's one thread; nothing here is thread-safe.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .jobs import Family, ModelLoadError, ModelSpec

log = logging.getLogger("imagegate.local")

Operation = Literal["text2image", "image2image", "inpaint"]
# The text-to-image class of each family, and every class name a directory of that family may carry.
PIPELINE_CLASSES: dict[Family, str] = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                                       "flux": "FluxPipeline", "qwen-image": "QwenImagePipeline"}
FAMILY_CLASS_NAMES: dict[Family, tuple[str, ...]] = {
    "sd15": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    "sdxl": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
    "flux": ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    "qwen-image": ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"),
}
# Module sets that are 4-D convolutions, where channels_last can help (the Qwen VAE is 3-D: excluded).
CHANNELS_LAST_MODULES: dict[Family, tuple[str, ...]] = {"sd15": ("unet", "vae"), "sdxl": ("unet", "vae"),
                                                        "flux": ("vae",), "qwen-image": ()}
TILING_PIXELS = 2_000_000  # vae_tiling=None: tiled decode above this many pixels
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                     "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(spec: ModelSpec, device: str) -> torch.dtype:
    if spec.dtype == "auto":
        # bf16 where there is a GPU (SDXL's VAE included: bf16 has fp32's range); fp32 on CPU, where bf16 is slower.
        return torch.float32 if device == "cpu" else torch.bfloat16
    dtype: torch.dtype = getattr(torch, spec.dtype)
    return dtype


def _quiet_libraries() -> None:
    # Load-time tqdm bars are noise in a server log; the denoising bars are turned off per view.
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


@dataclass(eq=False)
class LoadedPipeline:
    """One resident model: the text-to-image pipeline that owns the weights, and its views."""

    spec: ModelSpec
    device: str
    dtype: torch.dtype
    base: Any
    nbytes: int = 0
    views: dict[Operation, Any] = field(default_factory=dict)
    loras: set[str] = field(default_factory=set)
    preview: Any = None  # previews.LatentPreviewer, fitted on first use
    _offload_owner: Any = None

    def view(self, operation: Operation) -> Any:
        """The pipeline for an operation: the base for text-to-image, a from_pipe view (same modules) otherwise."""
        if operation == "text2image":
            pipe = self.base
        elif operation in self.views:
            pipe = self.views[operation]
        else:
            import diffusers

            auto = (diffusers.AutoPipelineForImage2Image if operation == "image2image"
                    else diffusers.AutoPipelineForInpainting)
            pipe = auto.from_pipe(self.base)
            pipe.set_progress_bar_config(disable=True)  # from_pipe turns the bar back on
            self.views[operation] = pipe
        if self.spec.offload == "model" and self._offload_owner is not pipe and self.device != "cpu":
            # Model offload hooks chain the modules in one pipeline's order; views share the modules, so
            # the pipeline about to run re-installs them (diffusers docs: "reapply ... on the new pipeline").
            pipe.enable_model_cpu_offload(device=self.device)
            self._offload_owner = pipe
        return pipe

    def use_lora(self, name: str | None) -> None:
        """Activate one named LoRA (loading it on first use), or none. The views share the patched modules."""
        if name is None:
            if self.loras:
                self.base.disable_lora()
            return
        paths = dict(self.spec.loras)
        if name not in paths:
            raise ValueError(f"model {self.spec.name!r} has no LoRA named {name!r}")
        if name not in self.loras:
            try:
                self.base.load_lora_weights(str(paths[name]), adapter_name=name)
            except Exception as exc:
                raise ModelLoadError(f"model {self.spec.name!r}: LoRA {name!r} ({paths[name]}) failed to load: "
                                     f"{type(exc).__name__}: {exc}") from None
            self.loras.add(name)
        self.base.enable_lora()
        self.base.set_adapters([name])

    def set_tiling(self, width: int, height: int) -> None:
        vae = self.base.vae
        wanted = self.spec.vae_tiling if self.spec.vae_tiling is not None else width * height > TILING_PIXELS
        if wanted != getattr(vae, "use_tiling", False) and hasattr(vae, "enable_tiling"):
            vae.enable_tiling() if wanted else vae.disable_tiling()

    def release(self) -> None:
        """Drop every reference this entry holds, views included, so the weights can be freed."""
        self.views.clear()
        self.base = self.preview = self._offload_owner = None


def pipeline_bytes(pipe: Any) -> int:
    """Bytes of every parameter and buffer of the pipeline's modules (each module counted once)."""
    seen: set[int] = set()
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module) and id(component) not in seen:
            seen.add(id(component))
            for tensor in [*component.parameters(), *component.buffers()]:
                total += tensor.numel() * tensor.element_size()
    return total


def _safetensors_bytes(path: Path, dtype: torch.dtype) -> int:
    """What a .safetensors file's tensors take once loaded as `dtype` (floats converted, others as stored)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(path.stat().st_size - 8, 100_000_000):  # not a safetensors file: do not read "length"
            raise ValueError(f"{path} has no safetensors header")
        header = json.loads(f.read(length))
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in info["shape"]:
            count *= dim
        stored = info["dtype"]
        total += count * (size if stored.startswith(("F", "BF")) else SAFETENSORS_BYTES.get(stored, 4))
    return total


def estimate_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """A model's size before loading it, from the weight files' headers (file size where there is no header)."""
    path = Path(spec.path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin")]
        # A component with both plain and variant (.fp16.) files loads only the plain ones.
        plain = {p.parent for p in files if p.suffixes[:1] == [p.suffix]}
        files = [p for p in files if p.suffixes[:1] == [p.suffix] or p.parent not in plain]
        if any(p.suffix == ".safetensors" for p in files):
            files = [p for p in files if p.suffix == ".safetensors"]
    else:
        return 0
    total = 0
    for file in files:
        try:
            total += _safetensors_bytes(file, dtype) if file.suffix == ".safetensors" else file.stat().st_size
        except (OSError, ValueError, struct.error):  # broken files fail properly at load time
            total += file.stat().st_size if file.exists() else 0
    return total


def _check_family(spec: ModelSpec) -> None:
    """A directory names its pipeline class in model_index.json: refuse another family's model early."""
    index = Path(spec.path) / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"model {spec.name!r}: {spec.path} is not a diffusers directory (no model_index.json)")
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"model {spec.name!r}: {index} is unreadable ({exc})") from None
    for family, names in FAMILY_CLASS_NAMES.items():
        if class_name in names and family != spec.family:
            raise ModelLoadError(f"model {spec.name!r}: {spec.path} holds a {class_name} ({family}), "
                                 f"but the model is configured as family {spec.family!r}")


def _from_files(spec: ModelSpec, dtype: torch.dtype) -> Any:
    import diffusers

    cls = getattr(diffusers, PIPELINE_CLASSES[spec.family])
    extra: dict[str, Any] = {}
    if spec.family == "sd15":
        extra = {"safety_checker": None, "requires_safety_checker": False}
    elif spec.family == "sdxl":
        extra = {"add_watermarker": False}
    path = Path(spec.path)
    if path.is_dir():
        _check_family(spec)
        return cls.from_pretrained(str(path), dtype=dtype, local_files_only=True, **extra)
    if not path.is_file():
        raise ModelLoadError(f"model {spec.name!r}: {path} does not exist")
    if spec.config_dir is None or not Path(spec.config_dir).is_dir():
        raise ModelLoadError(f"model {spec.name!r}: the single file {path} needs config_dir, a local diffusers "
                             f"config directory (given: {spec.config_dir}); offline there is no Hub to ask")
    if not hasattr(cls, "from_single_file"):
        raise ModelLoadError(f"model {spec.name!r}: {cls.__name__} cannot load a single file; "
                             "use a diffusers directory")
    return cls.from_single_file(str(path), config=str(spec.config_dir), local_files_only=True, dtype=dtype, **extra)


def _swap_scheduler(pipe: Any, spec: ModelSpec) -> None:
    import diffusers

    cls = getattr(diffusers, spec.scheduler or "", None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ModelLoadError(f"model {spec.name!r}: {spec.scheduler!r} is not a diffusers scheduler class")
    compatible = {c.__name__ for c in pipe.scheduler.compatibles} | {type(pipe.scheduler).__name__}
    if cls.__name__ not in compatible:
        raise ModelLoadError(f"model {spec.name!r}: scheduler {cls.__name__} does not fit this model "
                             f"(compatible: {', '.join(sorted(compatible))})")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def _place(pipe: Any, spec: ModelSpec, device: str) -> None:
    if spec.offload == "none" or device == "cpu":
        # Offloading to the CPU from the CPU would only add hooks.
        pipe.to(device)
    elif spec.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


def _speed_up(pipe: Any, spec: ModelSpec) -> None:
    if spec.channels_last:
        for name in CHANNELS_LAST_MODULES[spec.family]:
            getattr(pipe, name).to(memory_format=torch.channels_last)
    if spec.vae_tiling and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
    if spec.compile:
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        # Regional compilation (the repeated blocks only) compiles ~8-10x faster than the whole model for the
        # same speed. dynamic=None: the first new size recompiles once and marks the dims dynamic
        # (docs/local-diffusers.md §3.7).
        if getattr(denoiser, "_repeated_blocks", None):
            denoiser.compile_repeated_blocks(fullgraph=True)
        else:
            denoiser.compile()


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's own OOM, or the RuntimeError that CUDA kernels and some libraries raise instead."""
    if isinstance(exc, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is the same class
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def load_pipeline(spec: ModelSpec, device: str) -> LoadedPipeline:
    """Load a model and prepare it for `device`; any failure is a ModelLoadError naming the model and the cause."""
    _quiet_libraries()
    dtype = resolve_dtype(spec, device)
    try:
        pipe = _from_files(spec, dtype)
        pipe.set_progress_bar_config(disable=True)
        if spec.scheduler:
            _swap_scheduler(pipe, spec)
        if spec.family == "sdxl" and dtype == torch.float16:
            # SDXL's VAE overflows in fp16 (black images): decode in fp32 (the pipeline upcasts when asked).
            pipe.vae.register_to_config(force_upcast=True)
        entry = LoadedPipeline(spec=spec, device=device, dtype=dtype, base=pipe)
        if spec.compile:
            # LoRAs change the graph: load them all before compiling instead of on first use.
            for name, _ in spec.loras:
                entry.use_lora(name)
            entry.use_lora(None)
        _place(pipe, spec, device)
        if spec.offload == "model" and device != "cpu":
            entry._offload_owner = pipe
        _speed_up(pipe, spec)
    except ModelLoadError:
        raise
    except Exception as exc:  # diffusers/transformers raise many kinds for broken files
        if is_out_of_memory(exc):
            raise  # not a broken model: the worker evicts the others and says so
        raise ModelLoadError(f"model {spec.name!r} ({spec.family}, {spec.path}) failed to load: "
                             f"{type(exc).__name__}: {exc}") from None
    entry.nbytes = pipeline_bytes(pipe)
    return entry
