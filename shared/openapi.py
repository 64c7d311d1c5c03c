"""The OpenAPI 3.1 document, built from the route table and the pydantic models, and the docs
page that shows it (Swagger UI, served from the swagger-ui-bundle package: no CDN)."""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path
from typing import Any

import orjson
from pydantic.json_schema import models_json_schema

from shared.errors import NotFound
from shared.routes import PREFIXES, ROUTES, Route

TITLE = "Ad moderation"
DESCRIPTION = (
    "Scores classified ads for rule violations, synchronously (`/predict`, `/predict/batch`, "
    "`/simple_predict`) or as a task (`/async_predict`, then `/moderation_result/{task_id}`). "
    "Every route is also served under the `/moderation` prefix. Errors are "
    '`{"detail": ...}`; validation errors list what is wrong, with `loc` starting at '
    "`body`, `query`, `path` or `header`."
)
_REASONS = {
    404: "Not found (the item or task does not exist)",
    405: "Method not allowed (see the Allow header)",
    413: "Request body too large (MAX_BODY_BYTES), or a batch over MAX_BATCH_SIZE",
    422: "Validation error",
    500: "Internal error",
    503: "A dependency (model, database) is not available; try again later",
}
_ERROR_SCHEMAS: dict[str, Any] = {
    "HTTPError": {
        "type": "object",
        "required": ["detail"],
        "properties": {"detail": {"type": "string"}},
    },
    "ValidationError": {
        "type": "object",
        "required": ["detail"],
        "properties": {
            "detail": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["loc", "msg", "type"],
                    "properties": {
                        "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                        "msg": {"type": "string"},
                        "type": {"type": "string"},
                    },
                },
            }
        },
    },
}
_HEALTH: dict[str, Any] = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string"}},
}


def _ref(model: type | None) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"} if model else {}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _parameters(route: Route, schemas: dict[str, Any]) -> list[dict[str, Any]]:
    parameters = []
    for where, model in (("path", route.path_params), ("query", route.query)):
        if model is None:
            continue
        for name, field in model.model_fields.items():
            schema = schemas[model.__name__]["properties"][name]
            parameters.append(
                {
                    "name": name,
                    "in": where,
                    # A query parameter here may come as JSON body instead.
                    "required": where == "path",
                    "schema": schema,
                    **({"description": field.description} if field.description else {}),
                }
            )
    for header in route.headers:
        parameters.append(
            {
                "name": header,
                "in": "header",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            }
        )
    return parameters


def _operation(route: Route, prefix: str, schemas: dict[str, Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": _json(_ref(route.response))},
    }
    for status in sorted({*route.errors, 405}):
        schema = "ValidationError" if status == 422 else "HTTPError"
        responses[str(status)] = {
            "description": _REASONS[status],
            "content": _json({"$ref": f"#/components/schemas/{schema}"}),
        }
    operation: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{route.handler}{prefix.replace('/', '_')}",
        "tags": [route.function],
        "responses": responses,
    }
    if parameters := _parameters(route, schemas):
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {
            "required": route.body_required,
            "content": _json(_ref(route.body)),
        }
    return operation


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every public route, with both prefixes."""
    documented = [route for route in ROUTES if route.documented]
    models = {
        model
        for route in documented
        for model in (route.response, route.body, route.query, route.path_params)
        if model is not None
    }
    _, definitions = models_json_schema(
        [(model, "validation") for model in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    schemas = {**definitions.get("$defs", {}), **_ERROR_SCHEMAS}
    paths: dict[str, Any] = {}
    for prefix in PREFIXES:
        for route in documented:
            operation = _operation(route, prefix, schemas)
            paths.setdefault(prefix + route.path, {})[route.method.lower()] = operation
        for name, summary in (("health", "Liveness"), ("ready", "Readiness of every function")):
            paths[f"{prefix}/{name}"] = {
                "get": {
                    "summary": summary,
                    "operationId": f"{name}{prefix.replace('/', '_')}",
                    "tags": ["gateway"],
                    "responses": {
                        "200": {"description": "OK", "content": _json(_HEALTH)},
                        **(
                            {"503": {"description": "Not ready", "content": _json(_HEALTH)}}
                            if name == "ready"
                            else {}
                        ),
                    },
                }
            }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": importlib.metadata.version("ad-moderation"),
            "description": DESCRIPTION,
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }


@functools.cache
def _document_bytes() -> bytes:
    return orjson.dumps(document())


def _swagger_ui_dir() -> Path:
    import swagger_ui_bundle

    return Path(swagger_ui_bundle.swagger_ui_path)


# Relative URLs: the same page works under /docs and /moderation/docs.
_DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{title}</title>
  <link rel="stylesheet" href="docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{url: "openapi.json", dom_id: "#swagger-ui"}});
  </script>
</body>
</html>
"""
_ASSETS = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
}


async def openapi(request: Any) -> Any:
    from shared.http import Raw

    return Raw(_document_bytes(), "application/json")


async def docs(request: Any) -> Any:
    from shared.http import Raw

    return Raw(_DOCS_PAGE.format(title=TITLE).encode(), "text/html; charset=utf-8")


async def asset(request: Any, asset: str) -> Any:
    from shared.http import Raw

    media_type = _ASSETS.get(asset)
    if media_type is None:
        raise NotFound()
    body = _read_asset(asset)
    return Raw(body, media_type, {"Cache-Control": "public, max-age=86400"})


@functools.cache
def _read_asset(name: str) -> bytes:
    return (_swagger_ui_dir() / name).read_bytes()
