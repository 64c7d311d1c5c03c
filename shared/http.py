"""The HTTP boundary: routing, request parsing and error responses for every HTTP function.

The only module of `shared` that knows Starlette. Each function declares a Router of its
routes; every route is also served under the /moderation prefix (the original service's).
Errors are JSON `{"detail": ...}` as FastAPI answers them, so older clients keep working.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from shared import logs, metrics
from shared.config import get_settings
from shared.errors import (
    InvalidCloudEvent,
    ModerationError,
    NotFound,
    PayloadTooLarge,
    ValidationFailed,
)
from shared.messages import CLOUDEVENTS_BATCH, CloudEvent
from shared.routes import path_pattern, routes_of, strip_prefix
from shared.schemas import BatchRequest, ItemIdRequest

log = logging.getLogger(__name__)

Model = TypeVar("Model", bound=BaseModel)
Handler = Callable[..., Awaitable[Any]]


_JSON_CONTENT_TYPE = (b"content-type", b"application/json")


class JSONResponse(Response):
    media_type = "application/json"

    def __init__(
        self, content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        if headers:
            super().__init__(content, status_code, headers)
            return
        # Its two headers made directly: Response.__init__ works each one out, which cost
        # 2 µs of a /predict.
        self.status_code = status_code
        self.background = None
        self.body = self.render(content)
        self.raw_headers = [(b"content-length", b"%d" % len(self.body)), _JSON_CONTENT_TYPE]

    def render(self, content: Any) -> bytes:
        if isinstance(content, BaseModel):
            return content.__pydantic_serializer__.to_json(content)
        try:
            return orjson.dumps(content, default=str)
        except TypeError:  # an echoed input orjson refuses: an int beyond 64 bits, a surrogate
            return json.dumps(content, default=str).encode()


# nginx's status for a client that went away before its answer: never sent, only counted.
CLIENT_CLOSED_REQUEST = 499


def error_response(status: int, detail: Any) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


@dataclass(frozen=True)
class Raw:
    """A handler's answer that is not JSON (the docs page and its assets)."""

    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


class _Answered:
    """The requests this process answered, kept for a moment, then counted in the metrics and
    written as access lines together: 0.5 s after the first of a batch, every 200 requests,
    before /metrics answers, and at once from SIGTERM / SIGINT on (uvicorn ends a worker by
    raising the signal again once it has drained, so `atexit` never runs there). A request pays
    for appending a tuple; the metrics' locks and the write of the lines are paid once per batch
    (together ~10 % of a `/predict` when each request paid for its own)."""

    FLUSH_AFTER_SECONDS = 0.5
    FLUSH_AT = 200

    def __init__(self) -> None:
        self._entries: list[tuple[float, str, str, str, int, float, str]] = []
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._signals_hooked = False
        self.draining = False
        self._record = metrics.http_recorder()

    def add(
        self, started: float, route: str, method: str, path: str, status: int, rid: str
    ) -> None:
        """One answered request; `started` is its time.perf_counter() at arrival."""
        entries = self._entries
        entries.append((started, route, method, path, status, time.perf_counter() - started, rid))
        if len(entries) >= self.FLUSH_AT or self.draining:
            self.flush()
            return
        timer_loop = self._timer_loop
        if timer_loop is not None and not timer_loop.is_closed():
            return  # a flush is due (asked once a batch: get_running_loop is a getpid() call)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop: now
            self.flush()
            return
        loop.call_later(self.FLUSH_AFTER_SECONDS, self.flush)
        self._timer_loop = loop
        if not self._signals_hooked:
            self._hook_signals(loop)

    def _hook_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush when the server is told to stop, then let its own handler have the signal."""
        self._signals_hooked = True
        if threading.current_thread() is not threading.main_thread():
            return  # (a test client's loop thread: its process ends with atexit)
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if not callable(previous):
                continue  # no server handler to pass it on to: atexit covers a plain exit

            def on_signal(number: int, frame: Any, previous: Any = previous) -> None:
                self.draining = True  # requests still in flight are written as they end
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    loop.call_soon_threadsafe(self.flush)
                previous(number, frame)

            signal.signal(signum, on_signal)

    def flush(self) -> None:
        self._timer_loop = None
        entries, self._entries = self._entries, []
        try:
            metrics.flush_pending()
            if not entries:
                return
            self._record(entries)
            if logs.access.enabled:
                # Stamped with the time each request ended; the clock is read now, so a step
                # of the system clock shows in the next batch.
                wall = time.time() - time.perf_counter()
                line = logs.access.format
                logs.access.write(
                    [line(started + seconds + wall, method, path, status, seconds * 1e3, rid)
                     for started, _, method, path, status, seconds, rid in entries]
                )  # fmt: skip
        except Exception:  # a closed stdout must not fail the request that flushed
            log.exception("%d requests could not be counted or logged", len(entries))


answered = _Answered()
atexit.register(answered.flush)


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # "/moderation_result/{task_id}": a {name} segment is passed as a str kwarg
    handler: Handler
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", path_pattern(self.path))


class Router:
    """Dispatches a request to its endpoint; turns every failure into a JSON error."""

    def __init__(self, *endpoints: Endpoint) -> None:
        self.endpoints = endpoints
        # Most paths have no {parameter}: found by one dict lookup, with or without a slash
        # (a second one after taking off the /moderation prefix).
        self._exact: dict[str, list[Endpoint]] = {}
        self._templated: list[Endpoint] = []
        for endpoint in endpoints:
            if strip_prefix(endpoint.path) != endpoint.path:
                raise ValueError(f"{endpoint.path}: a route's path is given without the prefix")
            if "{" in endpoint.path:
                self._templated.append(endpoint)
            else:
                for path in (endpoint.path, endpoint.path + "/"):
                    self._exact.setdefault(path, []).append(endpoint)

    async def handle(self, request: Request) -> Response:
        """Answer a request; the answer carries its request id, and one access line says it.

        One coroutine, no per-request setup: this runs on every request of every function."""
        started = time.perf_counter()
        scope = request.scope
        given = traceparent = None
        for name, value in scope["headers"]:  # the two headers in one pass over the raw list
            if name == b"x-request-id":
                given = value.decode("latin-1")
            elif name == b"traceparent":
                traceparent = value.decode("latin-1")
        request_id = logs.new_request_id(given, traceparent)
        token = logs.request_id.set(request_id)
        # The path as decoded, not request.url.path: building a URL drops tabs and line
        # breaks (Python's urlsplit), so "/moderation_result/1%0a2" would read as task 12.
        method, path = scope["method"], scope["path"]
        route = "unmatched"  # the metrics label of a path no route serves
        try:
            try:
                endpoint, params = self._match(method, path)
                route = endpoint.path
                result = await endpoint.handler(request, **params)
            except _MethodNotAllowed as error:
                route = error.route
                result = error_response(error.status, error.detail)
                result.headers["Allow"] = ", ".join(error.detail_value)
            except ModerationError as error:
                result = error_response(error.status, error.detail_value)
            except ClientDisconnect:  # gone before its body arrived: counted and logged as 499
                result = error_response(CLIENT_CLOSED_REQUEST, "Client Closed Request")
            except Exception:
                log.exception("unhandled error on %s %r", method, path)
                result = error_response(500, "Internal server error")
            if isinstance(result, Response):
                response = result
            elif isinstance(result, Raw):
                headers = result.headers
                response = Response(result.body, media_type=result.media_type, headers=headers)
            else:
                response = JSONResponse(result)
            # Appended, not set through response.headers: no answer carries it yet, and the
            # id is ASCII (a client's is checked to be).
            response.raw_headers.append((b"x-request-id", request_id.encode()))
            answered.add(started, route, method, path, response.status_code, request_id)
            return response
        finally:
            logs.request_id.reset(token)

    def _match(self, method: str, path: str) -> tuple[Endpoint, dict[str, str]]:
        # No route path starts with the prefix, so a path found as it is needs no stripping.
        candidates = self._exact.get(path)
        params: dict[str, str] = {}
        if candidates is None:
            rest = strip_prefix(path)
            candidates = self._exact.get(rest)
        if candidates is None:
            candidates = []
            for endpoint in self._templated:
                found = endpoint.pattern.fullmatch(rest)
                if found:
                    candidates.append(endpoint)
                    params = found.groupdict()
        if not candidates:
            raise NotFound()
        for endpoint in candidates:
            if endpoint.method == method or (method == "HEAD" and endpoint.method == "GET"):
                return endpoint, params
        allowed = {endpoint.method for endpoint in candidates}
        if "GET" in allowed:
            allowed.add("HEAD")
        error = _MethodNotAllowed(sorted(allowed))
        error.route = candidates[0].path
        raise error


def function_router(
    function: str,
    *handlers: Handler,
    optional: tuple[str, ...] = (),
    **checks: Callable[[], Awaitable[bool]],
) -> Router:
    """The router of one function: its routes from the route table, each bound to the handler
    of that name, plus /health and /ready (with these checks).

    Fails at import, naming what is wrong, when a route has no handler or a handler no route.
    """
    from shared import openapi

    given: dict[str, Handler] = {handler.__name__: handler for handler in handlers}
    shared_handlers: dict[str, Handler] = {
        "openapi": openapi.openapi,
        "docs": openapi.docs,
        "docs_asset": openapi.asset,
    }
    endpoints = []
    for route in routes_of(function):
        handler: Handler | None = given.pop(route.handler, None) or shared_handlers.get(
            route.handler
        )
        if handler is None:
            raise RuntimeError(
                f"functions/{function}: no handler named {route.handler!r} "
                f"for {route.method} {route.path} (shared/routes.py)"
            )
        endpoints.append(Endpoint(route.method, route.path, handler))
    if given:
        raise RuntimeError(
            f"functions/{function}: {', '.join(sorted(given))} in no route of shared/routes.py"
        )
    health = health_routes(optional=optional, **checks)
    return Router(*endpoints, *health, Endpoint("GET", "/metrics", _metrics))


async def _metrics(request: Request) -> Raw:
    answered.flush()  # this worker's requests up to now (other workers' within 0.5 s)
    body, content_type = metrics.exposition()
    return Raw(body, content_type)


class _MethodNotAllowed(ModerationError):
    status = 405
    detail = "Method Not Allowed"
    route = "unmatched"


def validation_errors(error: ValidationError, where: str) -> list[dict[str, Any]]:
    """pydantic's error list in FastAPI's shape: loc starts with body/query/path."""
    details: list[dict[str, Any]] = []
    for item in error.errors(include_url=False):
        detail: dict[str, Any] = {**item, "loc": [where, *item["loc"]]}
        if "ctx" in item:
            detail["ctx"] = {key: str(value) for key, value in item["ctx"].items()}
        details.append(detail)
    return details


async def read_body(request: Request) -> bytes:
    """The whole body, refusing more than MAX_BODY_BYTES without reading it all: at once when
    Content-Length says more, else as the chunks arrive. Read from the ASGI messages directly:
    Starlette's request.body() goes through an async generator, 0.6 µs a request."""
    limit = get_settings().max_body_bytes
    for name, value in request.scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:  # (a non-number: servers refuse it)
                raise PayloadTooLarge()
            break
    chunks: list[bytes] = []
    size = 0
    receive = request.receive
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect: nobody to answer
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:  # a server that delivers more than was declared, or chunked
            raise PayloadTooLarge()
        if not message.get("more_body", False):
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


def parse(model: type[Model], data: bytes | dict[str, Any], where: str = "body") -> Model:
    """Validate into model. A JSON body is strict: `"3"` is no integer and `"yes"` no boolean;
    query and path values are text, so there `"3"` is the integer 3."""
    strict = where == "body"
    try:
        if isinstance(data, bytes):  # the validator itself: model_validate_json's wrapper
            return model.__pydantic_validator__.validate_json(data, strict=strict)  # is 30 %
        return model.model_validate(data, strict=strict)
    except ValidationError as error:
        raise ValidationFailed(validation_errors(error, where)) from None


async def parse_json(request: Request) -> Any:
    body = await read_body(request)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ValidationFailed(
            [{"type": "json_invalid", "loc": ["body"], "msg": f"Invalid JSON: {error}"}]
        ) from None


async def parse_item_id(request: Request) -> int:
    """`item_id` from the query string (original service A) or a JSON body (B). Both at once
    must agree: different values are 422."""
    body = await read_body(request)
    from_body = parse(ItemIdRequest, body).item_id if body.strip() else None
    if "item_id" in request.query_params:
        if len(request.query_params.getlist("item_id")) > 1:
            raise ValidationFailed(
                [{"type": "value_error", "loc": ["query", "item_id"],
                  "msg": "item_id is given more than once"}]
            )  # fmt: skip
        from_query = parse(ItemIdRequest, dict(request.query_params), "query").item_id
        if from_body is not None and from_body != from_query:
            raise ValidationFailed(
                [{"type": "value_error", "loc": ["body", "item_id"],
                  "msg": "item_id differs between the query string and the body"}]
            )  # fmt: skip
        return from_query
    if from_body is None:
        raise ValidationFailed(
            [{"type": "missing", "loc": ["query", "item_id"], "msg": "Field required"}]
        )
    return from_body


async def parse_batch(request: Request, max_items: int) -> BatchRequest:
    """`{"items": [ad, ...]}`; more than max_items is 413 before any item is validated."""
    data = await parse_json(request)
    items = data.get("items") if isinstance(data, dict) else None
    if isinstance(items, list) and len(items) > max_items:
        raise PayloadTooLarge(f"A batch holds at most {max_items} items, got {len(items)}")
    return parse(BatchRequest, data)


async def parse_cloudevent(request: Request) -> CloudEvent:
    """A CloudEvent in binary or structured mode: its data and attributes; 400 if it is none."""
    from cloudevents.http import from_http

    body = await read_body(request)
    try:
        event = from_http(dict(request.headers), body)
    except Exception as error:  # the SDK raises several kinds for a malformed event
        raise InvalidCloudEvent(f"Bad Request: not a CloudEvent: {error!r}"[:500]) from None
    return event.get_data(), dict(event.get_attributes())


# The attributes every CloudEvent carries (specversion is checked on its own).
_REQUIRED_ATTRIBUTES = ("id", "source", "type")
_DATA_MEMBERS = ("data", "data_base64")


def is_cloudevent_batch(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.partition(";")[0].strip().lower() == CLOUDEVENTS_BATCH


async def parse_cloudevent_batch(request: Request) -> list[CloudEvent | InvalidCloudEvent]:
    """The events of a batch, each as (data, attributes), or the reason it is no CloudEvent:
    one malformed event is refused alone. 400 if the body is not a JSON array at all."""
    body = await read_body(request)
    try:
        events = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidCloudEvent(f"Bad Request: not a CloudEvent batch: {error}"[:500]) from None
    if not isinstance(events, list):
        raise InvalidCloudEvent("Bad Request: a CloudEvent batch is a JSON array of events")
    return [_structured_event(event) for event in events]


def _structured_event(event: Any) -> CloudEvent | InvalidCloudEvent:
    """One structured-mode event: its data (bytes when sent as data_base64) and attributes."""
    if not isinstance(event, dict):
        return InvalidCloudEvent("Bad Request: not a CloudEvent: a batch element is no object")
    attributes = {name: value for name, value in event.items() if name not in _DATA_MEMBERS}
    if attributes.get("specversion") != "1.0":
        return InvalidCloudEvent("Bad Request: not a CloudEvent: specversion is not 1.0")
    for name in _REQUIRED_ATTRIBUTES:
        if not isinstance(attributes.get(name), str) or not attributes[name]:
            return InvalidCloudEvent(f"Bad Request: not a CloudEvent: no {name}")
    if "data_base64" not in event:
        return event.get("data"), attributes
    try:
        return base64.b64decode(event["data_base64"], validate=True), attributes
    except (TypeError, ValueError):  # binascii.Error is a ValueError
        return InvalidCloudEvent("Bad Request: not a CloudEvent: data_base64 is not base64")


MAX_IDEMPOTENCY_KEY = 255


# Printable ASCII, as HTTP header values carry it reliably.
_IDEMPOTENCY_KEY = re.compile(rf"[ -~]{{1,{MAX_IDEMPOTENCY_KEY}}}")


def idempotency_key(request: Request) -> str | None:
    """The optional Idempotency-Key header: the same key gives the same task."""
    key = request.headers.get("idempotency-key")
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ValidationFailed(
            [{"type": "string_pattern_mismatch", "loc": ["header", "Idempotency-Key"],
              "msg": f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII"
                     " characters"}]
        )  # fmt: skip
    return key


def replayed(answer: BaseModel) -> JSONResponse:
    """The answer to a request that repeats an earlier one (its Idempotency-Key), so marked."""
    return JSONResponse(answer, headers={"Idempotent-Replayed": "true"})


def health_routes(
    optional: tuple[str, ...] = (), **checks: Callable[[], Awaitable[bool]]
) -> Sequence[Endpoint]:
    """GET /health (the process answers) and GET /ready (every named check passes, except the
    optional ones: reported, but the function serves part of its routes without them)."""

    async def health(request: Request) -> dict[str, str]:
        return {"status": "ok"}

    async def ready(request: Request) -> Response:
        results = {name: await check() for name, check in checks.items()}
        ok = all(passed for name, passed in results.items() if name not in optional)
        body = {
            "status": "ready" if ok else "not ready",
            "checks": {name: "ok" if passed else "unavailable" for name, passed in results.items()},
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    return (Endpoint("GET", "/health", health), Endpoint("GET", "/ready", ready))
