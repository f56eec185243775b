"""Which adapter class serves each `type:` of the YAML `providers:` section."""

from __future__ import annotations

from .base import Provider
from .demo import DemoProvider
from .openai_compat import OpenAIProvider

KINDS: dict[str, type[Provider]] = {cls.kind: cls for cls in (DemoProvider, OpenAIProvider)}


def create(name: str, options: dict) -> Provider:
    """Build a provider instance from its raw YAML mapping (validated by the kind's Options)."""
    cls = KINDS[options["type"]]
    return cls(name, cls.Options.model_validate(options))
