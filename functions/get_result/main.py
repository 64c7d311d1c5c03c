"""get_result: the state and outcome of a moderation task."""

from __future__ import annotations

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from shared import db, http, logs, tasks
from shared.schemas import TaskIdPath, TaskResult

logs.start("get_result")


async def moderation_result(request: Request, task_id: str) -> TaskResult:
    path = http.parse(TaskIdPath, {"task_id": task_id}, where="path")
    return await tasks.result(path.task_id)


# Paths, methods and models of these handlers: shared/routes.py.
router = http.function_router("get_result", moderation_result, database=db.ping)


@functions_framework.aio.http
async def get_result(request: Request) -> Response:
    return await router.handle(request)
