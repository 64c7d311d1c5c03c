"""The route table and what is made from it: routing, the nginx config, the OpenAPI document."""

from __future__ import annotations

from pathlib import Path

import pytest
from openapi_spec_validator import validate

from moderation.gateway_config import render_nginx
from shared.openapi import document
from shared.routes import PREFIXES, ROUTES, function_of

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("path", "function"),
    [
        ("/predict", "predict"),
        ("/moderation/predict/batch", "predict"),
        ("/simple_predict", "predict"),
        ("/moderation/async_predict", "async_predict"),
        ("/moderation_result/5", "get_result"),
        ("/moderation/moderation_result/5", "get_result"),
        ("/moderation/docs", "predict"),
        ("/openapi.json", "predict"),
        ("/predictions", None),
        ("/moderation", None),
        ("/outbox/relay", None),
        ("/moderation_result/5/extra", None),
    ],
)
def test_route_table_routes_each_path_to_its_function(path: str, function: str | None) -> None:
    assert function_of(path) == function


def test_checked_in_nginx_config_is_the_one_the_route_table_gives() -> None:
    checked_in = (REPO_ROOT / "deploy" / "nginx" / "default.conf").read_text()
    assert checked_in == render_nginx(), (
        "deploy/nginx/default.conf is stale: "
        "run `moderation gateway-config > deploy/nginx/default.conf`"
    )


def test_nginx_config_routes_every_route_of_the_table() -> None:
    config = render_nginx()
    for route in ROUTES:
        if not route.public:
            assert route.function not in config  # the consumer is never behind the gateway
            continue
        literal = route.path.lstrip("/").split("{")[0].rstrip("/").replace(".", r"\.")
        assert literal in config, route.path
        assert f"proxy_pass http://{route.function};" in config


def test_openapi_document_is_valid_openapi_3_1() -> None:
    spec = document()
    assert spec["openapi"] == "3.1.0"
    validate(spec)


def test_openapi_document_lists_every_documented_route_with_both_prefixes_and_its_errors() -> None:
    paths = document()["paths"]
    documented = [route for route in ROUTES if route.documented]
    for route in documented:
        for prefix in PREFIXES:
            operation = paths[prefix + route.path][route.method.lower()]
            statuses = set(operation["responses"])
            assert statuses == {"200", "405", *map(str, route.errors)}, route.path
    listed = {path for path in paths if not path.endswith(("/health", "/ready"))}
    assert listed == {prefix + route.path for route in documented for prefix in PREFIXES}


def test_openapi_document_describes_the_ad_from_its_pydantic_model() -> None:
    ad = document()["components"]["schemas"]["Ad"]
    assert set(ad["required"]) == {
        "seller_id", "is_verified_seller", "item_id", "name", "description", "category",
        "images_qty",
    }  # fmt: skip
    assert ad["properties"]["seller_id"]["minimum"] == 1


@pytest.mark.parametrize("path", ["/health", "/moderation/ready"])
def test_dev_gateway_answers_a_wrong_method_on_its_own_routes_with_405(path: str) -> None:
    from starlette.testclient import TestClient

    from moderation.dev.gateway import create_gateway

    with TestClient(create_gateway({"predict": "http://127.0.0.1:1"})) as client:
        response = client.post(path)
        assert response.status_code == 405
        assert response.headers["allow"] == "GET, HEAD"
        assert response.json() == {"detail": "Method Not Allowed"}
        assert client.get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/moderation_result/%0a%01", 404),  # a line break inside: no route matches
        ("GET", "/moderation/moderation_result/1%0d%0a2", 404),
        ("TRACE", "/predict", 405),
        ("FOO", "/moderation_result/1", 405),
    ],
)
def test_dev_gateway_answers_what_it_cannot_route_with_json(
    method: str, path: str, status: int
) -> None:
    from starlette.testclient import TestClient

    from moderation.dev.gateway import create_gateway

    backends = {name: "http://127.0.0.1:1" for name in ("predict", "get_result")}
    with TestClient(create_gateway(backends)) as client:
        response = client.request(method, path)
    assert response.status_code == status
    assert response.json()["detail"]
    if status == 405:  # the route's own methods
        assert response.headers["allow"] == ("POST" if path == "/predict" else "GET, HEAD")


def test_dev_gateway_passes_a_functions_answer_on_as_it_was_sent() -> None:
    """Repeated headers stay repeated, the body's own length is kept (HEAD too), and the
    gateway adds no Date or Server of the function's beside uvicorn's."""
    import threading

    import uvicorn
    from starlette.testclient import TestClient

    from moderation.dev.gateway import create_gateway
    from tests.helpers import free_port, wait_for

    async def function(scope: dict, receive: object, send: object) -> None:
        if scope["type"] != "http":
            return
        await send({  # type: ignore[operator]
            "type": "http.response.start", "status": 201,
            "headers": [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"),
                        (b"content-type", b"application/json"), (b"content-length", b"2")],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": b"{}"})  # type: ignore[operator]

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(function, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or None, 10, "the stand-in function to serve")
        gateway = create_gateway({"predict": f"http://127.0.0.1:{port}"})
        with TestClient(gateway) as client:
            answer = client.post("/predict", json={})
            head = client.head("/moderation/predict")
        assert answer.status_code == 201 and answer.content == b"{}"
        assert answer.headers.get_list("set-cookie") == ["a=1", "b=2"]
        assert answer.headers.get_list("content-length") == ["2"]
        assert head.headers["content-length"] == "2"
    finally:
        server.should_exit = True
        thread.join(10)


def test_dev_gateway_before_it_has_started_answers_503() -> None:
    from starlette.testclient import TestClient

    from moderation.dev.gateway import create_gateway

    client = TestClient(create_gateway({"predict": "http://127.0.0.1:1"}))  # no lifespan run
    assert client.post("/predict", json={}).status_code == 503
    assert client.get("/ready").status_code == 503


def test_no_route_takes_a_path_segment_with_a_control_character() -> None:
    assert function_of("/moderation_result/12") == "get_result"
    for segment in ("1\n2", "\x00", "\x7f", "a\tb"):
        assert function_of(f"/moderation_result/{segment}") is None


def test_dashboard_and_scrape_config_use_only_declared_metrics() -> None:
    import json
    import re

    import yaml
    from prometheus_client import REGISTRY

    import shared.metrics  # noqa: F401 (declares them)

    declared = {
        sample_name
        for collector in list(REGISTRY._collector_to_names)
        for sample_name in REGISTRY._collector_to_names[collector]
    }
    dashboard = json.loads(
        (REPO_ROOT / "deploy/observability/grafana/dashboards/ad-moderation.json").read_text()
    )
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bmoderation_\w+", target["expr"])
    }
    assert used and used <= declared, used - declared
    scrape = yaml.safe_load((REPO_ROOT / "deploy/observability/prometheus.yml").read_text())
    targets = {
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    assert {t.split(":")[0] for t in targets} == {
        "predict", "async_predict", "get_result", "moderation_consumer", "adapter", "relay",
        "dlq-recorder",
    }  # fmt: skip


async def _answer(request: object) -> dict[str, str]:
    return {"ok": "yes"}


def test_a_function_router_finds_a_route_under_either_prefix_and_with_a_slash() -> None:
    from shared.http import Endpoint, Router

    router = Router(Endpoint("POST", "/predict", _answer), Endpoint("GET", "/r/{id}", _answer))
    for path in ("/predict", "/predict/", "/moderation/predict", "/moderation/predict/"):
        assert router._match("POST", path)[0].path == "/predict"
    assert router._match("GET", "/moderation/r/7") == (router.endpoints[1], {"id": "7"})
    for path in ("/moderation/moderation/predict", "/moderationpredict", "/predict//"):
        with pytest.raises(Exception, match="Not Found"):
            router._match("POST", path)


def test_a_function_router_refuses_a_route_path_given_with_the_prefix() -> None:
    from shared.http import Endpoint, Router

    with pytest.raises(ValueError, match="without the prefix"):
        Router(Endpoint("POST", "/moderation/predict", _answer))
