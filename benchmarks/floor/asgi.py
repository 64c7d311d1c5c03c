"""Below the floor, for benchmarks only: a bare ASGI app under uvicorn that reads the body and
answers the same constant. The distance to benchmarks/floor is what functions-framework's
Starlette application (its middleware, routing and Request) costs every request."""

from __future__ import annotations

from typing import Any

from benchmarks.floor.main import ANSWER

_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))],
}
_BODY = {"type": "http.response.body", "body": ANSWER}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(_START)
    await send(_BODY)
