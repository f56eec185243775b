"""The task object every surface answers with (`GET /v1/tasks/{id}`, a 202) and every webhook
event carries: a task record rendered with its result's links, billing in dollars (and credits),
and where its webhook delivery stands."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pybase64

from ..artifacts import ArtifactStore
from ..config import Config
from ..state import DeliveryRecord, TaskRecord
from .pricing import MICRO


class TaskViews:
    def __init__(self, cfg: Config, artifacts: ArtifactStore) -> None:
        self.cfg, self.artifacts = cfg, artifacts

    def render(self, task: TaskRecord, base_url: str, images: dict[str, bytes] | None = None, *,
               links_only: bool = False, webhook: dict[str, Any] | None = None) -> dict[str, Any]:
        """`images`: the bytes of a b64_json task's results; `links_only`: URLs in their place (a
        webhook event carries links, never bytes)."""
        body = {"id": task.id, "task_id": task.id, "object": "image.task", "status": task.status,
                "progress": task.progress, "created_at": int(task.created_at), "started_at": _int(task.started_at),
                "finished_at": _int(task.finished_at), "expires_at": int(task.expires_at), "model": task.model,
                "operation": task.operation, "result": self._result(task, base_url, images or {}, links_only),
                "output": self._output(task, base_url), "error": task.error, "billing": self._billing(task)}
        if webhook is not None:
            body["webhook"] = webhook
        return body

    def _billing(self, task: TaskRecord) -> dict[str, Any]:
        held, charged = task.billing.get("held_micros", 0), task.billing.get("charged_micros", 0)
        refunded = held - charged if task.status in ("failed", "canceled", "succeeded") else 0
        billing = {k: v for k, v in task.billing.items() if not k.endswith("_micros")}
        billing.update(held=held / float(MICRO), charged=charged / float(MICRO), refunded=refunded / float(MICRO))
        rate = self.cfg.billing.credits_per_usd
        if rate is not None:  # seed 003's display unit; the ledger stays exact micro-dollars
            billing.update({f"{name}_credits": float(Decimal(micros) * rate / MICRO)
                            for name, micros in (("held", held), ("charged", charged), ("refunded", refunded))})
        return billing

    def _url(self, task: TaskRecord, base_url: str, artifact_id: str) -> str:
        return self.artifacts.url_for(artifact_id, int(task.expires_at), base_url)

    def _output(self, task: TaskRecord, base_url: str) -> dict[str, Any] | None:
        """Seed 003's view of a succeeded task: each image as a signed URL and its artifact id."""
        if task.result is None:
            return None
        return {"images": [{"url": self._url(task, base_url, item["artifact_id"]), "artifact_id": item["artifact_id"]}
                           for item in task.result["data"]]}

    def _result(self, task: TaskRecord, base_url: str, images: dict[str, bytes],
                links_only: bool) -> dict[str, Any] | None:
        if task.result is None:
            return None
        data = []
        for item in task.result["data"]:
            out = dict(item)
            if task.response_format == "url" or links_only:
                out["url"] = self._url(task, base_url, item["artifact_id"])
            else:
                out["b64_json"] = pybase64.b64encode(images.get(item["artifact_id"], b"")).decode("ascii")
            data.append(out)
        return {**task.result, "data": data}


def delivery_view(url: str, delivery: DeliveryRecord | None) -> dict[str, Any]:
    """Where a task's webhook stands: `waiting` until the task ends, then its delivery's state."""
    if delivery is None:
        return {"url": url, "status": "waiting", "attempts": 0}
    view: dict[str, Any] = {"url": url, "id": delivery.id, "event": delivery.event, "status": delivery.status,
                            "attempts": delivery.attempts, "last_status": delivery.last_status}
    if delivery.status == "pending":
        view["next_attempt_at"] = int(delivery.next_attempt_at)
    if delivery.last_error:
        view["last_error"] = delivery.last_error
    return view


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)
