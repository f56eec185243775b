"""Which adapter class serves each `type:` of the YAML `providers:` section.

Adapters are imported on first use: a kind with heavy dependencies (the local diffusers backend
needs torch) costs nothing to a gateway that does not configure it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .base import Provider

_PATHS: dict[str, str] = {
    "demo": "imagegate.providers.demo:DemoProvider",
    "openai": "imagegate.providers.openai_compat:OpenAIProvider",
    "a1111": "imagegate.providers.a1111:A1111Provider",
    "bfl": "imagegate.providers.bfl:BFLProvider",
    "dashscope": "imagegate.providers.dashscope:DashScopeProvider",
    "gemini": "imagegate.providers.gemini:GeminiProvider",
    "diffusers": "imagegate.providers.diffusers:DiffusersProvider",
    "comfyui": "imagegate.providers.comfyui:ComfyUIProvider",
}
KINDS: frozenset[str] = frozenset(_PATHS)


def kind_class(kind: str) -> type[Provider]:
    module, _, name = _PATHS[kind].partition(":")
    cls: type[Provider] = getattr(import_module(module), name)
    return cls


def create(name: str, options: dict[str, Any], base_dir: str = ".") -> Provider:
    """Build a provider instance from its raw YAML mapping (validated by the kind's Options; files
    it names, such as ComfyUI workflows, are relative to `base_dir`, the config file's folder)."""
    cls = kind_class(options["type"])
    return cls(name, cls.Options.model_validate(options, context={"base_dir": base_dir}))
