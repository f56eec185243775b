"""Routing: a model's ordered routes, tried with retries (attempts.py), behind each provider
instance's circuit breaker, concurrency limit and queue (resilience.py). Knows providers and
configuration, nothing of clients, keys or money."""

from .attempts import Trail
from .resilience import LimiterFull
from .router import ModelRoute, ModelRouter, Served

__all__ = ["LimiterFull", "ModelRoute", "ModelRouter", "Served", "Trail"]
