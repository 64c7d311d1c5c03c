"""async_predict: accept an ad for moderation; the answer comes later from get_result."""

from __future__ import annotations

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from shared import db, http, logs, tasks
from shared.schemas import TaskAccepted, TaskReplay

logs.start("async_predict")


async def accept(request: Request) -> TaskAccepted | Response:
    item_id = await http.parse_item_id(request)
    accepted = await tasks.accept(item_id, http.idempotency_key(request))
    return http.replayed(accepted) if isinstance(accepted, TaskReplay) else accepted


# Paths, methods and models of these handlers: shared/routes.py.
router = http.function_router("async_predict", accept, database=db.ping)


@functions_framework.aio.http
async def async_predict(request: Request) -> Response:
    return await router.handle(request)
