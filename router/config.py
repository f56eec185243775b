"""The YAML configuration: `${ENV}` interpolation, pydantic validation, errors listed by path."""

from __future__ import annotations

import os
import re
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imagegate.providers import registry

# The embedded default, read from the installed package (a wheel has no repository around it).
DEFAULT_CONFIG = resources.files("imagegate.config").joinpath("default.yaml")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 would read the `on:` of `retry` as True."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def parse_size(value: str) -> tuple[int, int] | None:
    match = _SIZE.match(value)
    return (int(match[1]), int(match[2])) if match else None


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    public_url: str = ""
    max_body_mb: float = Field(default=50, gt=0)
    request_timeout_s: float = Field(default=300, gt=0)
    shutdown_grace_s: float = Field(default=30, ge=0)  # SIGTERM: in-flight work gets this long
    max_image_pixels: int = Field(default=50_000_000, ge=1)


class StateConfig(_Strict):
    url: str = "sqlite:///./data/imagegate.db"
    # A task's replica renews its lease every lease_s/3; one that lapses (the replica died) is failed
    # and refunded by whichever replica's sweeper (every lease_s/2) sees it first.
    lease_s: float = Field(default=30, gt=0, le=3600)
    idempotency_hours: float = Field(default=24, gt=0)


class S3Config(_Strict):
    """An S3-compatible store. Credentials left empty are read by obstore from the environment
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, an instance role, …)."""

    endpoint: str = ""  # empty: AWS itself
    region: str = "us-east-1"
    access_key_id: str = ""
    secret_access_key: str = Field(default="", repr=False)
    session_token: str = Field(default="", repr=False)


class ArtifactsConfig(_Strict):
    dir: str = "./data/artifacts"
    url: str = ""  # s3://bucket/prefix: object storage instead of `dir`
    s3: S3Config = Field(default_factory=S3Config)
    # `url` results: presigned S3 GET URLs (clients fetch from the bucket; at most 7 days) or
    # gateway-signed URLs whose bytes the gateway streams. A local directory is always `gateway`.
    url_results: Literal["presigned", "gateway"] = "presigned"
    ttl_hours: float = Field(default=24, gt=0)
    # OpenAI b64_json answers of /v1/images/generations and /edits: keep each image as an artifact
    # too (its `artifact_id` can be fed back), or hand the base64 over and keep nothing (OpenAI's
    # own shape, and no file written per image). URL answers, seed 003's image-to-image, the
    # native endpoints and async tasks always keep theirs.
    keep_b64_answers: bool = True

    @field_validator("url")
    @classmethod
    def _bucket_url(cls, value: str) -> str:
        if value and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^?#]*)?$", value):
            raise ValueError("must be s3://bucket or s3://bucket/prefix (a bucket name as S3 allows)")
        return value

    @property
    def bucket(self) -> tuple[str, str] | None:
        """(bucket, prefix) when artifacts live in object storage."""
        if not self.url:
            return None
        bucket, _, prefix = self.url.removeprefix("s3://").partition("/")
        return bucket, prefix.strip("/")


class AuthConfig(_Strict):
    enabled: bool = False
    admin_key: str = ""
    signing_secret: str = ""


class MetricsConfig(_Strict):
    enabled: bool = True
    token: str = ""


class InputsConfig(_Strict):
    """Edit input images given as URLs: fetched by the gateway, so guarded against SSRF (router/fetch.py)."""

    url_fetch: bool = True  # false: an image URL is a 400, as before
    max_mb: float = Field(default=20, gt=0)
    timeout_s: float = Field(default=15, gt=0)  # the whole fetch: DNS, redirects and body
    # UNSAFE outside tests and closed deployments: plain http can be altered on the way, and private
    # addresses let any client reach the gateway's own network (loopback, 10/8, …).
    allow_http: bool = False
    allow_private: bool = False


class WebhooksConfig(_Strict):
    """Task-end callbacks, signed per Standard Webhooks (docs/providers.md §10)."""

    enabled: bool = True
    # The same guard as input URLs (router/fetch.py): UNSAFE outside tests and closed networks.
    allow_http: bool = False
    allow_private: bool = False
    timeout_s: float = Field(default=15, gt=0, le=120)  # one attempt: connect, send, answer
    max_attempts: int = Field(default=8, ge=1, le=20)
    # Waits before attempts 2, 3, …; the last repeats. The default spans about a day.
    backoff_s: list[float] = Field(default=[0, 5, 300, 1800, 7200, 18000, 36000], min_length=1)
    poll_s: float = Field(default=1.0, gt=0, le=60)  # how often a replica looks for due deliveries
    # With auth off there are no keys to hold secrets: this one (whsec_…) signs every event.
    secret: str = Field(default="", repr=False)

    @field_validator("backoff_s")
    @classmethod
    def _non_negative(cls, value: list[float]) -> list[float]:
        if any(wait < 0 for wait in value):
            raise ValueError("waits are seconds, 0 or more")
        return value

    @field_validator("secret")
    @classmethod
    def _whsec(cls, value: str) -> str:
        if value and not value.startswith("whsec_"):
            raise ValueError("a Standard Webhooks secret: whsec_ followed by base64")
        return value


class TasksConfig(_Strict):
    # An async task's own deadline; unset, the same as a synchronous request's (server.request_timeout_s).
    timeout_s: float | None = Field(default=None, gt=0)


class BillingConfig(_Strict):
    # A display unit: task envelopes add held/charged/refunded_credits. The ledger stays exact µ$.
    credits_per_usd: Decimal | None = Field(default=None, gt=0)

    @field_validator("credits_per_usd", mode="before")
    @classmethod
    def _exact_rate(cls, value: Any) -> Any:
        return _exact(value)


class SurfacesConfig(_Strict):
    """Which ways in are served (docs/architecture.md, "Adding a surface")."""

    openai: bool = True  # /v1
    a1111: bool = True  # /sdapi/v1 and /v2/automatic1111/sdapi/v1
    # Seed 004's family endpoints (/v2/image/{family}/…) → the configured model serving each;
    # an unmapped family is a 404. qwen-edit defaults to qwen's model.
    native: dict[Literal["flux", "gemini-3", "gpt-image", "qwen", "qwen-edit"], str] = Field(default_factory=dict)
    ui: bool = True  # the web page at /ui/ (and / redirecting there)


class AutoConfig(_Strict):
    policy: Literal["priority", "cheapest", "fastest", "least_busy"] = "priority"
    candidates: list[str] = Field(default_factory=list)


class Limits(_Strict):
    min_side: int = Field(default=64, ge=1)
    max_side: int = Field(default=2048, ge=1)
    multiple_of: int = Field(default=8, ge=1)
    max_n: int = Field(default=4, ge=1, le=16)

    @model_validator(mode="after")
    def _ordered(self) -> Limits:
        if self.min_side > self.max_side:
            raise ValueError("min_side is larger than max_side")
        return self


class Defaults(_Strict):
    steps: int | None = Field(default=None, ge=1, le=60)
    guidance_scale: float | None = Field(default=None, ge=0)
    negative_prompt: str | None = None
    strength: float | None = Field(default=None, ge=0, le=1)


RetryOn = Literal["connect", "timeout", "429", "5xx"]
RETRY_ON: tuple[RetryOn, ...] = ("connect", "timeout", "429", "5xx")


class RetryConfig(_Strict):
    attempts: int = Field(default=1, ge=1, le=10)  # calls to this route, the first included
    backoff_s: float = Field(default=0.5, ge=0)  # exponential backoff with full jitter from here …
    max_backoff_s: float = Field(default=8.0, ge=0)  # … up to here
    max_retry_after_s: float = Field(default=30.0, ge=0)  # a longer Retry-After: fall back instead of waiting
    on: list[RetryOn] = Field(default_factory=lambda: list(RETRY_ON))

    @field_validator("on", mode="before")
    @classmethod
    def _unquoted_codes(cls, value: Any) -> Any:
        # `on: [429, 5xx]` reads 429 as an int.
        return [str(v) for v in value] if isinstance(value, list) else value


class RouteConfig(BaseModel):
    # Extra keys (family, sampler, scheduler…) are route options for the adapter.
    model_config = ConfigDict(extra="allow")

    provider: str
    model: str
    retry: RetryConfig = Field(default_factory=RetryConfig)
    cost_per_mp: Decimal | None = None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


PriceTier = Literal["standard", "hd"]
PricedCapability = Literal["text_to_image", "image_to_image"]  # generations; edits and image-to-image


def _exact(value: Any) -> Any:
    """YAML reads 0.0015 as a float; going through str keeps the decimal the operator wrote."""
    if isinstance(value, dict):
        return {k: _exact(v) for k, v in value.items()}
    return str(value) if isinstance(value, float) else value


class ModelConfig(_Strict):
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    # USD per megapixel, or per image by capability and quality: one of the two (neither: free).
    price_per_mp: Decimal | None = Field(default=None, ge=0)
    price_per_image: dict[PricedCapability, dict[PriceTier, Annotated[Decimal, Field(ge=0)]]] | None = None
    default_size: str = "1024x1024"
    sizes: list[str] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    defaults: Defaults = Field(default_factory=Defaults)
    quality: dict[str, Defaults] = Field(default_factory=dict)
    capabilities: list[Literal["generate", "edit", "inpaint", "multi-reference", "transparent"]] | None = None
    allow_extra_fields: bool = False
    routes: list[RouteConfig] = Field(min_length=1)

    @field_validator("price_per_mp", "price_per_image", mode="before")
    @classmethod
    def _exact_price(cls, value: Any) -> Any:
        return _exact(value)

    @model_validator(mode="after")
    def _one_price(self) -> ModelConfig:
        if self.price_per_mp is not None and self.price_per_image is not None:
            raise ValueError("give price_per_mp or price_per_image, not both")
        for capability, tiers in (self.price_per_image or {}).items():
            if "standard" not in tiers:
                raise ValueError(f"price_per_image.{capability} needs a standard price (hd is optional)")
        return self

    @property
    def priced(self) -> bool:
        return self.price_per_mp is not None or self.price_per_image is not None

    @field_validator("default_size")
    @classmethod
    def _size_shape(cls, value: str) -> str:
        if parse_size(value) is None:
            raise ValueError(f"size '{value}' is not of the form WIDTHxHEIGHT")
        return value

    @field_validator("sizes")
    @classmethod
    def _sizes_shape(cls, value: list[str]) -> list[str]:
        for size in value:
            cls._size_shape(size)
        return value


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(min_length=1)
    default_model: str | None = None
    auto: AutoConfig = Field(default_factory=AutoConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    inputs: InputsConfig = Field(default_factory=InputsConfig)
    surfaces: SurfacesConfig = Field(default_factory=SurfacesConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
    billing: BillingConfig = Field(default_factory=BillingConfig)
    # Where the file came from, for relative paths and messages; not a YAML key.
    source: str = Field(default="", exclude=True)
    # (path, NAME) of each `${NAME}` that was unset and had no default.
    unset_env: list[tuple[str, str]] = Field(default_factory=list, exclude=True)

    @property
    def task_timeout_s(self) -> float:
        return self.tasks.timeout_s or self.server.request_timeout_s

    @property
    def longest_run_s(self) -> float:
        """No request or task runs longer: after this (and a grace) its hold and slot are abandoned."""
        return max(self.server.request_timeout_s, self.task_timeout_s)


def interpolate(value: Any, missing: list[tuple[str, str]], path: str = "") -> Any:
    """Replace `${NAME}` / `${NAME:-default}` in every string.

    As `:-` does in the shell, a name set to '' counts as unset. An unset name without a default
    becomes '' and is recorded with its path, so the provider that needed it can be disabled with
    a clear log line instead of failing later.
    """
    if isinstance(value, dict):
        return {k: interpolate(v, missing, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, missing, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        name, default = match[1], match[2]
        if os.environ.get(name):
            return os.environ[name]
        if default is None:
            missing.append((path, name))
            return ""
        return default

    return _ENV.sub(sub, value)


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _provider_problems(providers: dict[str, dict[str, Any]], base_dir: str) -> list[str]:
    problems = []
    for name, raw in providers.items():
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind not in registry.KINDS:
            known = ", ".join(sorted(registry.KINDS))
            problems.append(f"providers.{name}.type: unknown provider type {kind!r} (known: {known})")
            continue
        try:
            registry.kind_class(kind).Options.model_validate(raw, context={"base_dir": base_dir})
        except ValidationError as exc:
            problems += [f"providers.{name}.{_path(e['loc'])}: {e['msg']}" for e in exc.errors()]
    return problems


def _cross_problems(raw: dict[str, Any]) -> list[str]:
    """References between sections (route -> provider, names, default_model, auto candidates).

    Checked on the raw mapping, so that they are listed together with any field errors rather
    than only once those are fixed.
    """
    problems = []
    providers = _mapping(raw.get("providers"))
    names: dict[str, str] = {}
    for model_id, entry in _mapping(raw.get("models")).items():
        entry = _mapping(entry)
        for alias in [model_id, *_strings(entry.get("aliases"))]:
            if alias == "auto":
                problems.append(f"models.{model_id}: 'auto' is reserved")
            elif alias in names and names[alias] != model_id:
                problems.append(f"models.{model_id}.aliases: '{alias}' is already a name of model '{names[alias]}'")
            names[alias] = model_id
        for i, route in enumerate(_list(entry.get("routes"))):
            provider = _mapping(route).get("provider")
            if isinstance(provider, str) and provider not in providers:
                problems.append(f"models.{model_id}.routes[{i}].provider: unknown provider '{provider}'")
        try:
            model = ModelConfig.model_validate(entry)
        except ValidationError:
            continue  # its field errors are listed already
        for i, size in enumerate(model.sizes):
            if size not in model.sizes[:i] and not _within(parse_size(size), model.limits):
                problems.append(f"models.{model_id}.sizes[{i}]: '{size}' is outside the model's limits")
        if model.sizes and model.default_size not in model.sizes and "default_size" in model.model_fields_set:
            problems.append(f"models.{model_id}.default_size: not one of the model's sizes")
    for family, model_id in _mapping(_mapping(raw.get("surfaces")).get("native")).items():
        if isinstance(model_id, str) and model_id not in names:
            problems.append(f"surfaces.native.{family}: unknown model '{model_id}'")
    default_model = raw.get("default_model")
    if isinstance(default_model, str) and default_model not in names:
        problems.append(f"default_model: unknown model '{default_model}'")
    for i, cand in enumerate(_list(_mapping(raw.get("auto")).get("candidates"))):
        if isinstance(cand, str) and cand not in names:
            problems.append(f"auto.candidates[{i}]: unknown model '{cand}'")
    return problems


def _mapping(value: Any) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _strings(value: Any) -> list[str]:
    return [v for v in _list(value) if isinstance(v, str)]


def _within(size: tuple[int, int] | None, limits: Limits) -> bool:
    return size is not None and all(limits.min_side <= side <= limits.max_side for side in size)


def base_dir_of(source: str) -> str:
    """The folder files named in a configuration are relative to: its own, else the working one."""
    path = Path(source)
    return str(path.parent) if path.is_file() else "."


def load_text(text: str, source: str = "<string>") -> Config:
    """Parse and validate a configuration; raises ConfigError listing every problem by path."""
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: the top level must be a mapping"])
    missing: list[tuple[str, str]] = []
    raw = interpolate(raw, missing)
    problems: list[str] = []
    cfg: Config | None = None
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        problems += [f"{_path(e['loc'])}: {e['msg']}" for e in exc.errors()]
    if isinstance(raw.get("providers"), dict):
        problems += _provider_problems(raw["providers"], base_dir_of(source))
    problems += _cross_problems(raw)
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    cfg.source, cfg.unset_env = source, missing
    return cfg


def load(path: str | os.PathLike[str] | None = None) -> Config:
    file = Path(path) if path else DEFAULT_CONFIG
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror}"]) from None
    return load_text(text, str(file))
