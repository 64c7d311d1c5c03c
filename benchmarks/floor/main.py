"""The framework's floor, for benchmarks only: a functions-framework aio function served
exactly as `functions/predict` is, that reads the body and answers a constant of the same
shape. Whatever `predict` spends above this is the project's own work."""

from __future__ import annotations

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

ANSWER = b'{"is_violation":true,"probability":0.7694528991143091,"model_version":"floor"}'


@functions_framework.aio.http
async def predict(request: Request) -> Response:
    await request.body()
    return Response(ANSWER, media_type="application/json")
