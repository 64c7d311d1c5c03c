"""The predict function through functions-framework's own app: contract, validation, errors."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from shared.config import DEFAULT_MODEL_PATH, get_settings

AD = {
    "seller_id": 1,
    "is_verified_seller": True,
    "item_id": 100,
    "name": "Test Item",
    "description": "Test Description",
    "category": 1,
    "images_qty": 3,
}

FIELDS = list(AD)
WRONG_TYPE = {
    "seller_id": "invalid",
    "is_verified_seller": "invalid",
    "item_id": "invalid",
    "name": 12345,
    "description": 12345,
    "category": "invalid",
    "images_qty": "invalid",
}


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client("predict")


def test_predict_unverified_seller_without_images_is_violation(client: TestClient) -> None:
    response = client.post("/predict", json={**AD, "is_verified_seller": False, "images_qty": 0})
    assert response.status_code == 200
    body = response.json()
    assert body["is_violation"] is True
    assert body["probability"] == pytest.approx(0.77, abs=0.01)
    assert isinstance(body["model_version"], str) and body["model_version"]


def test_predict_verified_seller_with_images_is_not_violation(client: TestClient) -> None:
    response = client.post("/predict", json={**AD, "is_verified_seller": True, "images_qty": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["is_violation"] is False
    assert 0.0 <= body["probability"] < 0.5


@pytest.mark.parametrize("prefix", ["", "/moderation"])
def test_predict_routes_answer_with_and_without_prefix(client: TestClient, prefix: str) -> None:
    assert client.post(f"{prefix}/predict", json=AD).status_code == 200
    assert client.post(f"{prefix}/predict/batch", json={"items": [AD]}).status_code == 200
    assert client.get(f"{prefix}/health").json() == {"status": "ok"}


@pytest.mark.parametrize("field", FIELDS)
def test_predict_missing_field_is_422(client: TestClient, field: str) -> None:
    body = {k: v for k, v in AD.items() if k != field}
    response = client.post("/predict", json=body)
    assert response.status_code == 422
    assert any(error["loc"] == ["body", field] for error in response.json()["detail"])


@pytest.mark.parametrize("field", FIELDS)
def test_predict_wrong_type_is_422(client: TestClient, field: str) -> None:
    response = client.post("/predict", json={**AD, field: WRONG_TYPE[field]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", field]


@pytest.mark.parametrize("field", FIELDS)
def test_predict_null_field_is_422(client: TestClient, field: str) -> None:
    response = client.post("/predict", json={**AD, field: None})
    assert response.status_code == 422


@pytest.mark.parametrize("body", [b"{}", b"null", b"[]", b"", b"{not json", b'{"seller_id": 1,'])
def test_predict_empty_null_or_malformed_body_is_422(client: TestClient, body: bytes) -> None:
    response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert "detail" in response.json()


@pytest.mark.parametrize("field", ["item_id", "seller_id"])
@pytest.mark.parametrize("value", [0, -1, 2147483648])
def test_predict_id_out_of_range_is_422(client: TestClient, field: str, value: int) -> None:
    assert client.post("/predict", json={**AD, field: value}).status_code == 422


def test_predict_negative_images_is_422(client: TestClient) -> None:
    assert client.post("/predict", json={**AD, "images_qty": -1}).status_code == 422


@pytest.mark.parametrize(("category", "status"), [(-1, 200), (2147483647, 200), (2147483648, 422)])
def test_predict_category_is_any_int32(client: TestClient, category: int, status: int) -> None:
    assert client.post("/predict", json={**AD, "category": category}).status_code == status


def test_predict_batch_scores_each_item_like_predict(client: TestClient) -> None:
    items = [
        {**AD, "item_id": 1, "is_verified_seller": False, "images_qty": 0},
        {**AD, "item_id": 2, "is_verified_seller": True, "images_qty": 8},
    ]
    response = client.post("/predict/batch", json={"items": items})
    assert response.status_code == 200
    body = response.json()
    assert [r["item_id"] for r in body["results"]] == [1, 2]
    for item, result in zip(items, body["results"], strict=True):
        single = client.post("/predict", json=item).json()
        assert result["probability"] == pytest.approx(single["probability"], abs=1e-12)
        assert result["is_violation"] == single["is_violation"]
    assert body["model_version"] == single["model_version"]


def test_predict_batch_empty_list_gives_empty_results(client: TestClient) -> None:
    response = client.post("/predict/batch", json={"items": []})
    assert response.status_code == 200
    assert response.json()["results"] == []


def test_predict_batch_with_one_bad_item_names_its_index(client: TestClient) -> None:
    items = [AD, AD, {**AD, "images_qty": "many"}]
    response = client.post("/predict/batch", json={"items": items})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "items", 2, "images_qty"]


def test_predict_batch_over_the_limit_is_413(client: TestClient) -> None:
    limit = get_settings().max_batch_size
    response = client.post("/predict/batch", json={"items": [AD] * (limit + 1)})
    assert response.status_code == 413
    assert str(limit) in response.json()["detail"]


def test_predict_body_over_one_mebibyte_is_413(client: TestClient) -> None:
    huge = {**AD, "description": "x" * (1024 * 1024 + 1)}
    assert client.post("/predict", json=huge).status_code == 413


def test_predict_body_size_is_checked_whether_declared_or_chunked(client: TestClient) -> None:
    body = json.dumps(AD).encode()
    huge = json.dumps({**AD, "description": "x" * (1024 * 1024 + 1)}).encode()

    def chunks(data: bytes) -> Iterator[bytes]:  # no Content-Length: sent chunked
        yield from (data[i : i + 65536] for i in range(0, len(data), 65536))

    assert client.post("/predict", content=chunks(body)).status_code == 200
    assert client.post("/predict", content=chunks(huge)).status_code == 413
    # A declared length that understates the body (a server that does not enforce it).
    understated = {"Content-Length": "10", "Content-Type": "application/json"}
    assert client.post("/predict", content=huge, headers=understated).status_code == 413


def test_predict_body_in_many_small_chunks_is_read_whole(client: TestClient) -> None:
    body = json.dumps(AD).encode()
    small_chunks = (body[i : i + 7] for i in range(0, len(body), 7))
    response = client.post("/predict", content=small_chunks)
    assert response.status_code == 200
    assert response.json() == client.post("/predict", content=body).json()


def test_a_client_gone_before_its_body_arrived_is_a_499_and_no_error(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The server says http.disconnect instead of the body: nobody is left to answer, so it is
    counted and logged as 499 (nginx's "client closed request"), not as a server error."""
    sent: list[dict] = []

    async def disconnected() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080),
    }  # fmt: skip
    with caplog.at_level(logging.ERROR):
        client.portal.call(client.app, scope, disconnected, send)  # type: ignore[union-attr]
    assert sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    metrics = client.get("/metrics").text
    assert 'route="/predict",status="499"' in metrics


def test_predict_unknown_path_is_404_and_wrong_method_is_405(client: TestClient) -> None:
    assert client.post("/nope", json=AD).status_code == 404
    assert client.get("/moderation/nope").json() == {"detail": "Not Found"}
    wrong_method = client.get("/predict")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "POST"


def test_predict_ready_without_database_still_scores_bodies(client: TestClient) -> None:
    response = client.get("/ready")
    assert response.status_code == 200  # ad bodies are scored without a database
    assert response.json()["checks"] == {"model": "ok", "database": "unavailable"}
    assert client.post("/predict", json=AD).status_code == 200
    assert client.post("/simple_predict", params={"item_id": 1}).status_code == 503


def _use_model_dir(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    monkeypatch.setenv("MODEL_PATH", str(path))
    get_settings.cache_clear()


def test_predict_model_file_gone_after_start_is_503_with_a_log_line(
    make_client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copy(DEFAULT_MODEL_PATH, tmp_path / "model.onnx")
    shutil.copy(DEFAULT_MODEL_PATH.with_suffix(".json"), tmp_path / "model.json")
    _use_model_dir(monkeypatch, tmp_path / "model.onnx")
    client = make_client("predict")
    (tmp_path / "model.onnx").unlink()  # e.g. a volume unmounted under a running function
    with caplog.at_level(logging.ERROR, logger="shared.model"):
        response = client.post("/predict", json=AD)
    assert response.status_code == 503
    assert response.json() == {"detail": "Model is not available"}
    assert "not available" in response.json()["detail"]
    assert any("model is not available" in r.getMessage() for r in caplog.records)
    assert client.get("/ready").json()["checks"]["model"] == "unavailable"


def test_predict_corrupt_model_file_is_503_with_a_log_line(
    make_client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copy(DEFAULT_MODEL_PATH.with_suffix(".json"), tmp_path / "model.json")
    (tmp_path / "model.onnx").write_bytes(b"this is not an onnx graph")
    _use_model_dir(monkeypatch, tmp_path / "model.onnx")
    client = make_client("predict")
    with caplog.at_level(logging.ERROR, logger="shared.model"):
        response = client.post("/predict", json=AD)
    assert response.status_code == 503
    assert any("cannot be loaded" in r.getMessage() for r in caplog.records)
    # Batch scoring depends on the same model and fails the same way.
    assert client.post("/predict/batch", json={"items": [AD]}).status_code == 503


def test_predict_model_of_another_contract_is_refused(
    make_client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copy(DEFAULT_MODEL_PATH, tmp_path / "model.onnx")
    metadata = DEFAULT_MODEL_PATH.with_suffix(".json").read_text()
    (tmp_path / "model.json").write_text(metadata.replace('"category"', '"price"'))
    _use_model_dir(monkeypatch, tmp_path / "model.onnx")
    client = make_client("predict")
    with caplog.at_level(logging.ERROR, logger="shared.model"):
        assert client.post("/predict", json=AD).status_code == 503
    assert any("feature contract" in r.getMessage() for r in caplog.records)


def test_predict_internal_scoring_error_is_500_without_a_stack_trace(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared import model as model_module

    loaded = model_module.get_model()

    class BrokenSession:
        def run(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("ORT exploded at /secret/path")

    monkeypatch.setattr(loaded, "_session", BrokenSession())
    monkeypatch.setattr(loaded, "linear", None)  # single ads through onnxruntime too
    for path, body in (("/predict", AD), ("/predict/batch", {"items": [AD, AD]})):
        response = client.post(path, json=body)
        assert response.status_code == 500
        assert "error" in response.json()["detail"].lower()
        assert "secret" not in response.text


@pytest.mark.parametrize("target", ["predict", "async_predict", "get_result"])
@pytest.mark.parametrize("path", ["/health", "/moderation/ready"])
def test_function_wrong_method_on_health_is_405_with_allow(
    make_client, target: str, path: str
) -> None:
    response = make_client(target).post(path)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert response.json() == {"detail": "Method Not Allowed"}


@pytest.mark.parametrize("prefix", ["", "/moderation"])
def test_predict_serves_openapi_and_docs_without_internet(make_client, prefix: str) -> None:
    client = make_client("predict")
    spec = client.get(f"{prefix}/openapi.json").json()
    assert spec["openapi"] == "3.1.0" and "/predict" in spec["paths"]
    page = client.get(f"{prefix}/docs")
    assert page.headers["content-type"].startswith("text/html")
    assert 'src="docs/swagger-ui-bundle.js"' in page.text  # relative: no CDN, either prefix
    bundle = client.get(f"{prefix}/docs/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    assert client.get(f"{prefix}/docs/../../etc/passwd").status_code == 404


def test_predict_metrics_count_requests_by_route_template_and_predictions(make_client) -> None:
    client = make_client("predict")
    client.post("/predict", json=AD)
    client.post("/moderation/predict", json={})
    client.get("/no/such/path")
    text = client.get("/metrics").text
    assert 'moderation_http_requests_total{method="POST",route="/predict",status="200"}' in text
    assert 'moderation_http_requests_total{method="POST",route="/predict",status="422"}' in text
    assert 'route="unmatched",status="404"' in text
    assert 'moderation_predictions_total{outcome="ok"}' in text
    assert "moderation_inference_seconds_bucket" in text


@pytest.mark.parametrize(
    "body",
    [
        {**AD, "item_id": 2**70},
        {**AD, "seller_id": -(2**64)},
        {**AD, "is_verified_seller": "yes"},
        {**AD, "images_qty": "3"},
        {**AD, "name": "\ud800"},
    ],
)
def test_predict_hostile_values_are_422_json(client: TestClient, body: dict) -> None:
    content = json.dumps(body).encode()  # the stdlib writes what orjson would refuse
    response = client.post("/predict", content=content)
    assert response.status_code == 422
    assert response.json()["detail"]


def test_simple_predict_item_id_in_query_and_body_must_agree(make_client, database_url) -> None:
    from tests.conftest import insert_ad

    ad = insert_ad(database_url)
    client = make_client("predict")
    item = {"item_id": ad["item_id"]}
    assert client.post("/simple_predict", params=item, json=item).status_code == 200
    conflict = client.post("/simple_predict", params=item, json={"item_id": ad["item_id"] + 1})
    assert conflict.status_code == 422
    assert conflict.json()["detail"][0]["loc"] == ["body", "item_id"]


def test_a_request_gets_one_access_line_with_its_id_status_and_end_time(
    make_client, capsys: pytest.CaptureFixture[str]
) -> None:
    client = make_client("predict")
    capsys.readouterr()
    before = time.time()
    client.post("/predict", json=AD, headers={"X-Request-ID": "line-1"})
    after = time.time()
    client.get("/metrics")  # writes what is pending
    entries = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if "line-1" in line
    ]
    (entry,) = [entry for entry in entries if entry["logger"] == "moderation.access"]
    assert entry["message"].startswith("POST /predict 200 ") and entry["status"] == 200
    assert before - 0.01 <= datetime.fromisoformat(entry["timestamp"]).timestamp() <= after + 0.01
