"""GET /v1/tasks/{id} and POST /v1/tasks/{id}/cancel, and the task object every surface answers
a 202 with. The tasks themselves run in the pipeline (router/pipeline/task_runner.py)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pybase64
from starlette.requests import Request
from starlette.responses import Response

from ..pipeline import MICRO, Caller, Pipeline, Reply, TaskRecord
from .context import caller_of, mark
from .responses import JSONResponse


def accepted(pipeline: Pipeline, caller: Caller, record: TaskRecord) -> Reply:
    return Reply.json(task_object(pipeline, caller, record, None), status=202,
                      headers={"location": f"/v1/tasks/{record.id}", "x-imagegate-task": record.id,
                               "x-imagegate-model": record.model})


def task_object(pipeline: Pipeline, caller: Caller, task: TaskRecord,
                images: dict[str, bytes] | None) -> dict[str, Any]:
    held, charged = task.billing.get("held_micros", 0), task.billing.get("charged_micros", 0)
    refunded = held - charged if task.status in ("failed", "canceled", "succeeded") else 0
    billing = {k: v for k, v in task.billing.items() if not k.endswith("_micros")}
    billing.update(held=held / float(MICRO), charged=charged / float(MICRO), refunded=refunded / float(MICRO))
    rate = pipeline.cfg.billing.credits_per_usd
    if rate is not None:  # seed 003's display unit; the ledger stays exact micro-dollars
        billing.update({f"{name}_credits": float(Decimal(micros) * rate / MICRO)
                        for name, micros in (("held", held), ("charged", charged), ("refunded", refunded))})
    return {"id": task.id, "task_id": task.id, "object": "image.task", "status": task.status,
            "progress": task.progress, "created_at": int(task.created_at), "started_at": _int(task.started_at),
            "finished_at": _int(task.finished_at), "expires_at": int(task.expires_at), "model": task.model,
            "operation": task.operation, "result": _result(pipeline, caller, task, images or {}),
            "output": _output(pipeline, caller, task), "error": task.error, "billing": billing}


def _output(pipeline: Pipeline, caller: Caller, task: TaskRecord) -> dict[str, Any] | None:
    """Seed 003's view of a succeeded task: each image as a signed URL and its artifact id."""
    if task.result is None:
        return None
    return {"images": [{"url": pipeline.url_for(caller, item["artifact_id"], int(task.expires_at)),
                        "artifact_id": item["artifact_id"]} for item in task.result["data"]]}


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _result(pipeline: Pipeline, caller: Caller, task: TaskRecord, images: dict[str, bytes]) -> dict[str, Any] | None:
    if task.result is None:
        return None
    data = []
    for item in task.result["data"]:
        out = dict(item)
        if task.response_format == "url":
            out["url"] = pipeline.url_for(caller, item["artifact_id"], int(task.expires_at))
        else:
            out["b64_json"] = pybase64.b64encode(images.get(item["artifact_id"], b"")).decode("ascii")
        data.append(out)
    return {**task.result, "data": data}


async def get_task(request: Request) -> Response:
    pipeline, caller = mark(request, "/v1/tasks/{id}").pipeline, caller_of(request)
    task = await pipeline.tasks.owned(request.path_params["task_id"], caller)
    return JSONResponse(task_object(pipeline, caller, task, await pipeline.tasks.images_of(task)))


async def cancel_task(request: Request) -> Response:
    pipeline, caller = mark(request, "/v1/tasks/{id}/cancel").pipeline, caller_of(request)
    task = await pipeline.tasks.cancel(request.path_params["task_id"], caller)
    return JSONResponse(task_object(pipeline, caller, task, None))
