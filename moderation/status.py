"""The readiness of the whole service in one answer: asks every component's /ready at once
(the functions, the consumer, the adapter, the relay, the dead-letter recorder) and is 503 when
any of them is not ready. The dev gateway answers its /ready with it; in compose, the `status`
service does, and the nginx gateway routes /ready there."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def readiness(
    client: httpx.AsyncClient, components: Mapping[str, str]
) -> tuple[int, dict[str, Any]]:
    """(status code, body) from every component's /ready, asked concurrently."""

    async def one(base: str) -> tuple[int, object]:
        try:
            response = await client.get(f"{base}/ready", timeout=5.0)
            return response.status_code, response.json()
        except (httpx.HTTPError, ValueError):
            return 503, "unreachable"

    names = sorted(components)
    answers = await asyncio.gather(*(one(components[name]) for name in names))
    ok = all(status == 200 for status, _ in answers)
    body = {
        "status": "ready" if ok else "not ready",
        "components": {name: answer for name, (_, answer) in zip(names, answers, strict=True)},
    }
    return (200 if ok else 503), body


def create_status_app(components: Mapping[str, str]) -> Starlette:
    """GET /ready (every component) and GET /health (this process), with or without the
    /moderation prefix; any other method is 405."""
    client = httpx.AsyncClient()

    async def ready(request: Request) -> Response:
        status, body = await readiness(client, components)
        return JSONResponse(body, status_code=status)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def not_allowed(request: Request) -> Response:
        return JSONResponse(
            {"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": "GET, HEAD"}
        )

    others = ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
    routes = []
    for prefix in ("", "/moderation"):
        routes += [
            Route(f"{prefix}/ready", ready, methods=["GET"]),
            Route(f"{prefix}/health", health, methods=["GET"]),
            Route(f"{prefix}/ready", not_allowed, methods=others),
            Route(f"{prefix}/health", not_allowed, methods=others),
        ]
    return Starlette(routes=routes)
