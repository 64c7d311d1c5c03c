"""simple_predict against the real embedded PostgreSQL: found, missing, invalid, database down."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from starlette.testclient import TestClient

from moderation.dev.embedded_postgres import EmbeddedPostgres
from tests.conftest import insert_ad

pytestmark = pytest.mark.integration


@pytest.fixture
def client(database_url: str, make_client: Callable[[str], TestClient]) -> TestClient:
    return make_client("predict")


@pytest.mark.parametrize("prefix", ["", "/moderation"])
def test_simple_predict_finds_stored_ad_by_query_param(
    client: TestClient, database_url: str, prefix: str
) -> None:
    ad = insert_ad(database_url, is_verified_seller=False, images_qty=0)
    response = client.post(f"{prefix}/simple_predict", params={"item_id": ad["item_id"]})
    assert response.status_code == 200
    body = response.json()
    assert body["is_violation"] is True
    assert isinstance(body["probability"], float)
    # The same ad scored by body gives the same answer.
    assert client.post("/predict", json=ad).json() == body


def test_simple_predict_finds_stored_ad_by_json_body(client: TestClient, database_url: str) -> None:
    ad = insert_ad(database_url, images_qty=1, description="Short description", category=50)
    response = client.post("/simple_predict", json={"item_id": ad["item_id"]})
    assert response.status_code == 200
    assert response.json()["is_violation"] is True
    assert response.json()["probability"] == pytest.approx(0.635, abs=0.01)


def test_simple_predict_verified_seller_with_images_is_not_violation(
    client: TestClient, database_url: str
) -> None:
    ad = insert_ad(database_url, is_verified_seller=True, images_qty=8, category=75)
    response = client.post("/simple_predict", json={"item_id": ad["item_id"]})
    assert response.status_code == 200
    assert response.json()["is_violation"] is False


def test_simple_predict_unknown_item_is_404(client: TestClient) -> None:
    response = client.post("/simple_predict", params={"item_id": 2_000_000_000})
    assert response.status_code == 404
    assert response.json() == {"detail": "Item not found"}


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"params": {"item_id": 0}},
        {"params": {"item_id": "abc"}},
        {"params": {"item_id": 2147483648}},
        {"json": {"item_id": 0}},
        {"json": {"item_id": "abc"}},
        {"json": {}},
        {},
    ],
)
def test_simple_predict_invalid_item_id_is_422(client: TestClient, request_kwargs: dict) -> None:
    response = client.post("/simple_predict", **request_kwargs)
    assert response.status_code == 422
    assert response.json()["detail"]


def test_simple_predict_without_database_url_is_503(
    make_client: Callable[[str], TestClient],
) -> None:
    response = make_client("predict").post("/simple_predict", params={"item_id": 1})
    assert response.status_code == 503
    assert "database" in response.json()["detail"].lower()


def test_simple_predict_database_stopped_is_503_then_recovers(
    disposable_postgres: EmbeddedPostgres, make_client: Callable[[str], TestClient]
) -> None:
    ad = insert_ad(disposable_postgres.url)
    client = make_client("predict")
    assert client.post("/simple_predict", params={"item_id": ad["item_id"]}).status_code == 200

    disposable_postgres.stop()
    response = client.post("/simple_predict", params={"item_id": ad["item_id"]})
    assert response.status_code == 503
    assert response.json() == {"detail": "Database is not available"}
    ready = client.get("/ready")
    assert ready.status_code == 200  # still serves ad bodies...
    assert ready.json()["checks"]["database"] == "unavailable"  # ...and says what is missing
    # Scoring by body needs no database and keeps working.
    assert client.post("/predict", json=ad).status_code == 200

    disposable_postgres.start()
    statuses = [
        client.post("/simple_predict", params={"item_id": ad["item_id"]}).status_code
        for _ in range(10)
    ]
    assert statuses[-1] == 200, statuses
    assert set(statuses) <= {200, 503}


def test_simple_predict_database_down_at_start_is_503(
    disposable_postgres: EmbeddedPostgres, make_client: Callable[[str], TestClient]
) -> None:
    disposable_postgres.stop()
    client = make_client("predict")
    response = client.post("/simple_predict", params={"item_id": 1})
    assert response.status_code == 503
    assert response.json() == {"detail": "Database is not available"}
