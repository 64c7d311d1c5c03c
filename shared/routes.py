"""The one route table: every public HTTP route, the function that serves it, the name of its
handler, its request and response models and its error answers.

Each function's router (`shared.http.function_router`), the dev gateway, the compose nginx
config (`moderation gateway-config`) and the OpenAPI document (`shared.openapi`) are made from
it, so adding a route is one edit here plus its handler. Every route is served with and without
the original service's `/moderation` prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import BaseModel

from shared.schemas import (
    Ad,
    BatchRequest,
    BatchResponse,
    ItemIdRequest,
    Prediction,
    TaskAccepted,
    TaskIdPath,
    TaskResult,
)

PREFIXES = ("", "/moderation")
HTTP_FUNCTIONS = ("predict", "async_predict", "get_result")
# Served by every HTTP function about itself; the gateway answers /health and /ready for all.
OPERATIONAL_PATHS = ("/health", "/ready", "/metrics")


def path_pattern(path: str) -> re.Pattern[str]:
    """A route path as a regex: each {name} segment is a named group; a trailing / is allowed.
    A segment holds no control character: functions-framework's own router does not match a
    path with a line break inside, so such a path must not be routed to a function at all."""
    regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/\\x00-\\x1f\\x7f]+)", re.escape(path))
    return re.compile(f"{regex}/?")


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # "/moderation_result/{task_id}": a {name} segment is passed as a str kwarg
    function: str  # the function (folder under functions/) that serves it
    handler: str  # the handler's name in that function's main.py, or a shared one (docs)
    summary: str
    response: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    body_required: bool = True
    query: type[BaseModel] | None = None
    path_params: type[BaseModel] | None = None
    headers: tuple[str, ...] = ()  # optional request headers it reads
    errors: tuple[int, ...] = ()
    documented: bool = True  # listed in the OpenAPI document
    public: bool = True  # routed by the gateways; the consumer's route never is
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", path_pattern(self.path))


ROUTES: tuple[Route, ...] = (
    Route(
        "POST", "/predict", "predict", "predict_ad", "Score an ad",
        response=Prediction, body=Ad, errors=(413, 422, 500, 503),
    ),
    Route(
        "POST", "/predict/batch", "predict", "predict_batch", "Score up to MAX_BATCH_SIZE ads",
        response=BatchResponse, body=BatchRequest, errors=(413, 422, 500, 503),
    ),
    Route(
        "POST", "/simple_predict", "predict", "simple_predict",
        "Score a stored ad (item_id as query parameter or JSON body)",
        response=Prediction, body=ItemIdRequest, body_required=False, query=ItemIdRequest,
        errors=(404, 413, 422, 503),
    ),
    Route(
        "POST", "/async_predict", "async_predict", "accept",
        "Accept a stored ad for moderation; the result comes from /moderation_result",
        response=TaskAccepted, body=ItemIdRequest, body_required=False, query=ItemIdRequest,
        headers=("Idempotency-Key",), errors=(404, 413, 422, 503),
    ),
    Route(
        "GET", "/moderation_result/{task_id}", "get_result", "moderation_result",
        "The state and outcome of a moderation task",
        response=TaskResult, path_params=TaskIdPath, errors=(404, 422, 503),
    ),
    Route(
        "POST", "/", "moderation_consumer", "moderation_event",
        "Score one queued ad, delivered as a CloudEvent (KafkaSource or the push adapter)",
        documented=False, public=False,
    ),
    Route("GET", "/openapi.json", "predict", "openapi", "This document", documented=False),
    Route("GET", "/docs", "predict", "docs", "Interactive API docs", documented=False),
    Route("GET", "/docs/{asset}", "predict", "docs_asset", "Docs assets", documented=False),
)  # fmt: skip


def routes_of(function: str) -> tuple[Route, ...]:
    return tuple(route for route in ROUTES if route.function == function)


def strip_prefix(path: str) -> str:
    """The path without the original service's /moderation prefix."""
    if path == "/moderation" or path.startswith("/moderation/"):
        return path[len("/moderation") :] or "/"
    return path


def allowed_methods(path: str) -> list[str]:
    """The methods the route table serves on a path (either prefix), HEAD with GET."""
    rest = strip_prefix(path)
    methods = {route.method for route in ROUTES if route.public and route.pattern.fullmatch(rest)}
    if rest.rstrip("/") in ("/health", "/ready"):
        methods.add("GET")
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def function_of(path: str) -> str | None:
    """The function that serves a path (either prefix), or None."""
    rest = strip_prefix(path)
    for route in ROUTES:
        if route.public and route.pattern.fullmatch(rest):
            return route.function
    return None
