"""moderation_consumer: a Kafka record delivered as a CloudEvent, scored or retried or
dead-lettered. A 2xx answer means the outcome is durable; anything else means "deliver again".
A batch of them (CloudEvents' batched content mode) is answered with a result per event."""

from __future__ import annotations

from typing import Any

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from shared import consumer, db, http, logs, model

logs.start("moderation_consumer", needs_model=True)


async def moderation_event(request: Request) -> dict[str, Any]:
    if http.is_cloudevent_batch(request):
        events = await http.parse_cloudevent_batch(request)
        return {"results": await consumer.handle_batch(events)}
    data, attributes = await http.parse_cloudevent(request)
    return {"outcome": await consumer.handle(data, attributes)}


# An HTTP function rather than functions-framework's CloudEvent one, so that it also serves
# /health, /ready and /metrics. Paths and methods: shared/routes.py.
router = http.function_router(
    "moderation_consumer", moderation_event, model=model.ready, database=db.ping
)


@functions_framework.aio.http
async def moderation_consumer(request: Request) -> Response:
    return await router.handle(request)
