"""Prometheus metrics. Labels stay bounded: endpoint templates, configured model ids, status codes."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

# Up to 600 s: a large diffusion job behind a queue can take minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """One registry per app, so several apps in one process (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("imagegate_requests", "HTTP requests answered",
                                ["endpoint", "model", "status"], registry=self.registry)
        self.latency = Histogram("imagegate_request_seconds", "Time to answer a request",
                                 ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("imagegate_images", "Images delivered", ["model"], registry=self.registry)
        self.megapixels = Counter("imagegate_megapixels", "Megapixels delivered", ["model"], registry=self.registry)
        self.cost = Counter("imagegate_cost_usd", "Cost of delivered images in USD", ["model"],
                            registry=self.registry)

    def observe(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()
        self.latency.labels(endpoint, model).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
