"""Options shared by every provider instance in the YAML `providers:` section.

Each adapter subclasses `ProviderOptions` with its own fields; unknown keys are errors, so a
typo in the YAML is reported by path instead of being silently ignored.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CircuitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    failures: int = Field(default=5, ge=1)  # consecutive failures that open the circuit
    cooldown_s: float = Field(default=30.0, gt=0)  # open this long, then one probe is let through


class ProviderOptions(BaseModel):
    """What the router enforces around every instance (the adapter itself reads only timeout_s)."""

    model_config = ConfigDict(extra="forbid")

    type: str
    enabled: bool = True
    max_concurrency: int = Field(default=16, ge=1)  # calls in flight to this instance
    max_queue: int = Field(default=64, ge=0)  # calls waiting beyond that; more get 429
    timeout_s: float = Field(default=300.0, gt=0)  # one whole call, polling and downloads included
    circuit: CircuitOptions = Field(default_factory=CircuitOptions)


class HTTPProviderOptions(ProviderOptions):
    """For adapters that call a remote HTTP API."""

    base_url: str
    api_key: str = ""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=64, ge=1)
    # Hosts (besides base_url's) that result URLs may be downloaded from; ".example.com" = any subdomain.
    download_hosts: list[str] = Field(default_factory=list)
    max_download_mb: float = Field(default=50.0, gt=0)
    max_answer_mb: float = Field(default=256.0, gt=0)  # an API answer (JSON with base64 images), read whole
    download_timeout_s: float = Field(default=60.0, gt=0)
