"""Hostile but well-formed requests on a function's own port: each gets a deliberate status
with a JSON {"detail": ...} body, never a 5xx."""

from __future__ import annotations

import json

import psycopg
import pytest
from starlette.testclient import TestClient

from shared.logs import new_request_id

AD = {
    "seller_id": 1, "is_verified_seller": False, "item_id": 1, "name": "Phone",
    "description": "Test Description", "category": 1, "images_qty": 0,
}  # fmt: skip


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client("predict")


def _deliberate(response, status: int) -> None:
    assert response.status_code == status, response.text
    assert "detail" in response.json() if status >= 400 else response.json()


@pytest.mark.parametrize("depth", [100, 1_000, 100_000])
def test_deeply_nested_json_is_422(client: TestClient, depth: int) -> None:
    body = b'{"name": ' + b"[" * depth + b"]" * depth + b"}"
    _deliberate(client.post("/predict", content=body), 422)


def test_a_key_given_twice_counts_once_the_last(client: TestClient) -> None:
    body = json.dumps(AD)[:-1] + ', "images_qty": 5}'  # images_qty 0, then 5
    answer = client.post("/predict", content=body.encode())
    assert answer.json() == client.post("/predict", json={**AD, "images_qty": 5}).json()


@pytest.mark.parametrize(
    "text", ["\x00", "a\x00b", "\x07\x1b[31m\r\n", "\u202e\ufeff", "😀" * 1000, "x" * 500_000]
)
def test_any_unicode_in_a_text_field_is_scored(client: TestClient, text: str) -> None:
    _deliberate(client.post("/predict", json={**AD, "name": text, "description": text}), 200)


@pytest.mark.parametrize(
    "value",
    ["ключ", "a" * 129, "bad\x7fid", "", " ", 'a"}', "back\\slash"],
)
def test_an_unusable_request_id_is_replaced_by_a_new_one(client: TestClient, value: str) -> None:
    answer = client.post("/predict", json=AD, headers={"X-Request-ID": value.encode()})
    _deliberate(answer, 200)
    assert answer.headers["x-request-id"] != value
    assert answer.headers["x-request-id"].isascii()


@pytest.mark.parametrize(
    "value", ["00-zz-yy-01", "😀", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "00-abc"]
)
def test_a_malformed_traceparent_is_ignored(client: TestClient, value: str) -> None:
    answer = client.post("/predict", json=AD, headers={"traceparent": value.encode()})
    _deliberate(answer, 200)
    assert answer.headers["x-request-id"] not in value  # a new id, not a piece of it


def test_a_traceparent_names_the_request() -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert new_request_id(None, f"00-{trace}-00f067aa0ba902b7-01") == trace


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "é/ü", "\x01"]
)
def test_content_type_is_not_checked(client: TestClient, content_type: str) -> None:
    answer = client.post(
        "/predict", content=json.dumps(AD), headers={"Content-Type": content_type.encode()}
    )
    _deliberate(answer, 200)


@pytest.mark.parametrize(
    "query",
    ["item_id=99999999999999999999999", "item_id=-0", "item_id=%00", "item_id=1e3",
     "item_id=\uff11", "item_id=1&item_id=2"],  # \uff11: a full-width digit one
)  # fmt: skip
def test_odd_item_ids_in_the_query_are_422(make_client, query: str, database_url: str) -> None:
    _deliberate(make_client("predict").post(f"/simple_predict?{query}"), 422)


@pytest.mark.parametrize(
    "path",
    ["/moderation_result/%00", "/moderation_result/1%0a", "/moderation_result/%F0%9F%98%80",
     "/moderation_result/" + "9" * 400, "/moderation_result/%2e%2e%2fetc",
     "/moderation_result/1%092"],
)  # fmt: skip
def test_odd_task_ids_in_the_path_are_4xx(make_client, path: str, database_url: str) -> None:
    """Also when a task 1 or 12 exists: a line break or tab is not dropped from the path."""
    from tests.conftest import insert_ad

    with psycopg.connect(database_url) as conn:
        item = insert_ad(database_url)["item_id"]
        for _ in range(12):
            conn.execute("INSERT INTO moderation_results (item_id) VALUES (%s)", (item,))
    answer = make_client("get_result").get(path)
    assert answer.status_code in (404, 422), answer.text
    assert "detail" in answer.json()


def test_a_line_break_inside_a_path_is_not_dropped(make_client, database_url: str) -> None:
    """Not read as task 12 (URL parsing drops line breaks). functions-framework's own router
    answers such a path itself, with a plain-text 404 (the gateways answer it in JSON)."""
    from tests.conftest import insert_ad

    with psycopg.connect(database_url) as conn:
        item = insert_ad(database_url)["item_id"]
        for _ in range(12):
            conn.execute("INSERT INTO moderation_results (item_id) VALUES (%s)", (item,))
    assert make_client("get_result").get("/moderation_result/1%0a2").status_code == 404
