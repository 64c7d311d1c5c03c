"""One base URL for the dev stack: routes each path to the function that serves it, by the
route table (shared/routes.py).

In production a real gateway (nginx, Envoy, a Knative/Cloud Run domain mapping) does this.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
import yarl
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from moderation.status import readiness
from shared.routes import allowed_methods, function_of, strip_prefix

log = logging.getLogger(__name__)

# Hop-by-hop headers are the proxy's own business, never forwarded.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host"}
# Of a function's answer: hop-by-hop, and what uvicorn sets itself.
_NOT_PASSED_ON = _HOP_BY_HOP | {"date", "server"}


def create_gateway(
    backends: Mapping[str, str], components: Mapping[str, str] | None = None
) -> Starlette:
    """backends: function name -> base URL; components: other processes whose /ready the
    gateway's /ready includes (the consumer, the adapter, the relay...) -> base URL."""
    everything = {**backends, **(components or {})}
    # Made when the app starts, closed when it stops (its lifespan): requests are passed on
    # with aiohttp, ~0.09 ms of CPU each against httpx's ~1.3 ms, which made the gateway the
    # limit of the asynchronous path; /ready asks with httpx, as `moderation status` does.
    clients: dict[str, Any] = {}

    async def proxy(request: Request) -> Response:
        path = request.scope["path"]  # as decoded: request.url.path drops line breaks
        if strip_prefix(path).rstrip("/") in ("/health", "/ready"):
            if request.method not in ("GET", "HEAD"):
                return JSONResponse(
                    {"detail": "Method Not Allowed"},
                    status_code=405,
                    headers={"Allow": "GET, HEAD"},
                )
            if strip_prefix(path).rstrip("/") == "/health":
                return JSONResponse({"status": "ok"})
            return await ready()
        function = function_of(path)
        if function is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        upstreams: aiohttp.ClientSession | None = clients.get("upstreams")
        if upstreams is None:
            return JSONResponse({"detail": "The gateway is not started"}, status_code=503)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        # The path and query as the client sent them, still percent-encoded: decoded, a path
        # may hold characters that are no part of a URL (control bytes, spaces).
        target = backends[function] + request.scope["raw_path"].decode("latin-1")
        if query := request.scope["query_string"]:
            target += "?" + query.decode("latin-1")
        try:
            url = yarl.URL(target, encoded=True)  # passed on as it came, not encoded again
        except ValueError:
            return JSONResponse({"detail": "Invalid request path"}, status_code=400)
        try:
            async with upstreams.request(
                request.method, url, headers=headers, data=await request.body() or None,
                allow_redirects=False,
            ) as upstream:  # fmt: skip
                content = await upstream.read()
        except aiohttp.InvalidURL:  # (a ClientError too: checked first)
            return JSONResponse({"detail": "Invalid request path"}, status_code=400)
        except (aiohttp.ClientError, TimeoutError) as error:
            log.warning("%s %s: %s did not answer: %r", request.method, path, function, error)
            return JSONResponse({"detail": f"{function} is not available"}, status_code=502)
        response = Response(content, upstream.status)
        # The function's headers as it sent them, repeated ones too (its Content-Length fits
        # the body, which is passed on undecoded); uvicorn adds its own Date and Server.
        response.raw_headers = [
            (name.lower(), value)
            for name, value in upstream.raw_headers
            if name.lower().decode("latin-1") not in _NOT_PASSED_ON
        ]
        return response

    async def ready() -> Response:
        """Ready when every function behind the gateway, and every other component, is."""
        if "ready" not in clients:
            return JSONResponse({"detail": "The gateway is not started"}, status_code=503)
        status, body = await readiness(clients["ready"], everything)
        return JSONResponse(body, status_code=status)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        clients["upstreams"] = aiohttp.ClientSession(
            # Idle connections are dropped after 1 s, before the functions' server closes
            # them (gunicorn's keep-alive is 2 s): reusing one it is closing fails a request.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=1.0),
            timeout=aiohttp.ClientTimeout(total=60.0),
            auto_decompress=False,  # bytes as the function sent them, with its headers
            # Only the client's own headers, nothing aiohttp would add by itself.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        clients["ready"] = httpx.AsyncClient(timeout=60.0)
        try:
            yield
        finally:
            upstreams, ready_client = clients.pop("upstreams"), clients.pop("ready")
            await upstreams.close()
            await ready_client.aclose()

    async def not_routed(request: Request, error: Exception) -> Response:
        """Starlette's own 404 and 405 (a path its catch-all route does not match, e.g. with a
        line break inside; a method outside `methods`), as JSON like every other answer."""
        code = getattr(error, "status_code", 404)
        detail = "Method Not Allowed" if code == 405 else "Not Found"
        allowed = ", ".join(allowed_methods(request.scope["path"]))
        headers = {"Allow": allowed} if code == 405 else None
        return JSONResponse({"detail": detail}, status_code=code, headers=headers)

    return Starlette(
        routes=[Route("/{path:path}", proxy, methods=methods)],
        exception_handlers={404: not_routed, 405: not_routed},
        lifespan=lifespan,
    )
