"""Prometheus metrics. Labels stay bounded: endpoint templates, configured model and provider
names, status codes and a fixed set of outcomes — never prompts, keys or request ids.

With several uvicorn worker processes (`imagegate serve --workers N`) prometheus-client's
multiprocess mode is on (PROMETHEUS_MULTIPROC_DIR): every process writes its samples to files in
that directory and /metrics, whichever process answers it, adds them all up.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

# Up to 600 s: a large diffusion job behind a queue can take minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROCESS_ENV))


class Metrics:
    """One registry per app, so several apps in one process (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("imagegate_requests", "HTTP requests answered",
                                ["endpoint", "model", "status"], registry=r)
        self.latency = Histogram("imagegate_request_seconds", "Time to answer a request",
                                 ["endpoint", "model", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("imagegate_images", "Images delivered", ["model"], registry=r)
        self.megapixels = Counter("imagegate_megapixels", "Megapixels delivered", ["model"], registry=r)
        self.cost = Counter("imagegate_cost_usd", "Cost of delivered images in USD", ["model"], registry=r)
        self.attempts = Counter("imagegate_upstream_attempts", "Calls to upstreams by outcome",
                                ["provider", "outcome"], registry=r)
        self.upstream_latency = Histogram("imagegate_upstream_seconds", "Time of one upstream call",
                                          ["provider"], buckets=LATENCY_BUCKETS, registry=r)
        self.retries = Counter("imagegate_upstream_retries", "Repeated calls to the same route", ["provider"],
                               registry=r)
        self.fallbacks = Counter("imagegate_fallbacks", "Requests served (or tried) by a later route",
                                 ["model", "from_provider", "to_provider"], registry=r)
        self.rejections = Counter("imagegate_route_skips", "Routes skipped without a call",
                                  ["provider", "reason"], registry=r)
        self.tasks = Counter("imagegate_tasks", "Async tasks submitted, and ended by status "
                             "(submitted, succeeded, failed, canceled)", ["status"], registry=r)
        self.webhooks = Counter("imagegate_webhook_deliveries", "Webhook attempts by outcome (delivered, "
                                "retrying, failed: gave up, disabled: the receiver answered 410)", ["outcome"],
                                registry=r)
        # Gauges of live state: summed over live processes; the circuit shows the worst process's view.
        self.circuit = Gauge("imagegate_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open",
                             ["provider"], registry=r, multiprocess_mode="max")
        self.in_flight = Gauge("imagegate_upstream_in_flight", "Calls in flight per provider", ["provider"],
                               registry=r, multiprocess_mode="livesum")
        self.queued = Gauge("imagegate_upstream_queue_depth", "Calls waiting per provider", ["provider"],
                            registry=r, multiprocess_mode="livesum")
        # What an upstream says of itself (ComfyUI's queue and step), set by whichever process answers
        # the scrape just before rendering: with several workers, its value is the most recent one.
        self.server_queue = Gauge("imagegate_upstream_server_queue", "Prompts the upstream server reports "
                                  "queued or running, all clients included", ["provider"], registry=r,
                                  multiprocess_mode="livemostrecent")
        self.server_progress = Gauge("imagegate_upstream_progress", "Fraction done of the upstream's running "
                                     "prompt (0 when idle)", ["provider"], registry=r,
                                     multiprocess_mode="livemostrecent")
        # The children each request updates, by their (bounded) labels: prometheus-client's
        # `labels` costs more than the update itself.
        self._answered: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._delivered: dict[str, tuple[Counter, Counter, Counter]] = {}

    def observe_upstream(self, provider: str, report: dict[str, object]) -> None:
        """Copy the gauges a provider reports of its server (`Provider.report()`), at scrape time."""
        queue, progress = report.get("server_queue"), report.get("progress")
        if isinstance(queue, int):
            self.server_queue.labels(provider).set(queue)
        if "progress" in report:
            self.server_progress.labels(provider).set(progress if isinstance(progress, float) else 0.0)

    def observe(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        """One request answered."""
        children = self._answered.get((endpoint, model, status))
        if children is None:
            labels = (endpoint, model, str(status))
            children = self._answered[endpoint, model, status] = (self.requests.labels(*labels),
                                                                  self.latency.labels(*labels))
        children[0].inc()
        children[1].observe(seconds)

    def delivered(self, model: str, images: int, megapixels: float, cost: float) -> None:
        """Images delivered (and priced) by one request."""
        children = self._delivered.get(model)
        if children is None:
            children = self._delivered[model] = (self.images.labels(model), self.megapixels.labels(model),
                                                 self.cost.labels(model))
        children[0].inc(images)
        children[1].inc(megapixels)
        children[2].inc(cost)

    def delivered_by_model(self) -> dict[str, dict[str, float]]:
        """This process's delivered images, megapixels and cost per model (the console's view)."""
        out: dict[str, dict[str, float]] = {}
        for name, counter in (("images", self.images), ("megapixels", self.megapixels), ("cost_usd", self.cost)):
            for sample in (s for metric in counter.collect() for s in metric.samples):
                if sample.name.endswith("_total"):
                    out.setdefault(sample.labels["model"], {})[name] = sample.value
        return out

    def render(self) -> tuple[bytes, str]:
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    @staticmethod
    def process_exit(pid: int | None = None) -> None:
        """Drop this process's (or worker `pid`'s) live gauges from the sums; its counters stay counted."""
        if multiprocess():
            mark_process_dead(os.getpid() if pid is None else pid)
