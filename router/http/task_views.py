"""GET /v1/tasks/{id} and POST /v1/tasks/{id}/cancel, and the task object every surface answers
a 202 with. The tasks themselves run in the pipeline (router/pipeline/task_runner.py)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..pipeline import Caller, Pipeline, Reply, TaskRecord
from .context import caller_of, mark
from .responses import JSONResponse


def accepted(pipeline: Pipeline, caller: Caller, record: TaskRecord) -> Reply:
    return Reply.json(task_object(pipeline, caller, record, None), status=202,
                      headers={"location": f"/v1/tasks/{record.id}", "x-imagegate-task": record.id,
                               "x-imagegate-model": record.model})


def task_object(pipeline: Pipeline, caller: Caller, task: TaskRecord,
                images: dict[str, bytes] | None) -> dict[str, Any]:
    return pipeline.views.render(task, caller.base_url, images)


async def get_task(request: Request) -> Response:
    pipeline, caller = mark(request, "/v1/tasks/{id}").pipeline, caller_of(request)
    task = await pipeline.tasks.owned(request.path_params["task_id"], caller)
    return JSONResponse(await pipeline.task_view(caller, task))


async def cancel_task(request: Request) -> Response:
    pipeline, caller = mark(request, "/v1/tasks/{id}/cancel").pipeline, caller_of(request)
    task = await pipeline.tasks.cancel(request.path_params["task_id"], caller)
    return JSONResponse(task_object(pipeline, caller, task, None))
