"""predict: score an ad now — by its body, in a batch, or by the id of a stored ad."""

from __future__ import annotations

from typing import Any

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from shared import db, http, logs, model, scoring
from shared.schemas import Ad, BatchResponse

settings = logs.start("predict", needs_model=True)


async def predict_ad(request: Request) -> dict[str, Any]:
    return scoring.predict(http.parse(Ad, await http.read_body(request)))


async def predict_batch(request: Request) -> BatchResponse:
    batch = await http.parse_batch(request, max_items=settings.max_batch_size)
    return scoring.predict_batch(batch.items)


async def simple_predict(request: Request) -> dict[str, Any]:
    return await scoring.predict_stored(await http.parse_item_id(request))


# Paths, methods and models of these handlers: shared/routes.py.
# Ready without a database: ad bodies are scored all the same (simple_predict answers 503).
router = http.function_router(
    "predict", predict_ad, predict_batch, simple_predict,
    model=model.ready, database=db.ping, optional=("database",),
)  # fmt: skip


@functions_framework.aio.http
async def predict(request: Request) -> Response:
    return await router.handle(request)
