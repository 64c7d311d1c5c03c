"""The whole stack as `moderation dev` runs it: functions, adapter, relay, dead-letter recorder,
gateway, real PostgreSQL and a real broker. Every call goes through the one base URL."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import insert_ad
from tests.e2e.stack import Driver, running_stack
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    with running_stack() as driver:
        yield driver


def accept_without_publishing(driver: Driver, item_id: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """async_predict's transaction, then a crash before the publish: only the outbox has it."""
    from shared import db, tasks
    from shared.config import get_settings

    monkeypatch.setenv("DATABASE_URL", driver.database_url)
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)  # publishing fails at once
    get_settings.cache_clear()

    async def accept() -> int:
        try:
            return (await tasks.accept(item_id)).task_id
        finally:
            await db.close()

    return asyncio.run(accept())


def test_stack_serves_every_route_on_one_base_url(driver: Driver) -> None:
    ad = insert_ad(driver.database_url)
    for prefix in ("", "/moderation"):
        assert driver.http.post(f"{prefix}/predict", json=ad).status_code == 200
        assert driver.http.post(f"{prefix}/predict/batch", json={"items": [ad]}).status_code == 200
        simple = driver.http.post(f"{prefix}/simple_predict", json={"item_id": ad["item_id"]})
        assert simple.status_code == 200
        accepted = driver.http.post(f"{prefix}/async_predict", params={"item_id": ad["item_id"]})
        assert accepted.status_code == 200
        result = driver.http.get(f"{prefix}/moderation_result/{accepted.json()['task_id']}")
        assert result.status_code == 200
    assert driver.http.get("/nothing/here").status_code == 404
    # Percent-encoded odd characters reach the function as sent (was a 500); a control byte in
    # a segment matches no route.
    odd = driver.http.get("/moderation_result/%F3%A7%A4%A6%C3%87%C2%A0%27%C2%98%C2%A5")
    assert odd.status_code == 422 and odd.json()["detail"]
    control = driver.http.get("/moderation_result/%F3%A7%A4%A6%C3%87%C2%A0%27%C2%98%10%C2%A5")
    assert control.status_code == 404 and control.json()["detail"]
    for prefix in ("", "/moderation"):
        assert driver.http.get(f"{prefix}/openapi.json").json()["openapi"] == "3.1.0"
        assert driver.http.get(f"{prefix}/docs/swagger-ui-bundle.js").status_code == 200
    ready = driver.http.get("/moderation/ready")
    assert ready.status_code == 200
    assert set(ready.json()["components"]) == {
        "predict", "async_predict", "get_result", "moderation_consumer", "adapter", "relay",
        "dlq-recorder",
    }  # fmt: skip
    assert ready.json()["components"]["relay"]["checks"] == {"broker": "ok", "database": "ok"}
    for process in ("predict", "moderation_consumer", "adapter", "relay"):
        exposition = httpx.get(f"{driver.stack.urls[process]}/metrics").text
        assert "# TYPE moderation_" in exposition, process


def metric(driver: Driver, process: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels, read from a process's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{driver.stack.urls[process]}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_count_every_request_and_every_task(driver: Driver) -> None:
    ad = insert_ad(driver.database_url)
    body = {key: ad[key] for key in ad}
    requests = {"name": "moderation_http_requests_total", "route": "/predict", "status": "200"}
    scored = {"name": "moderation_predictions_total"}
    before = metric(driver, "predict", **requests), metric(driver, "predict", **scored)
    for _ in range(5):
        assert driver.http.post("/moderation/predict", json=body).status_code == 200
    assert driver.http.post("/predict/batch", json={"items": [body] * 3}).status_code == 200

    def counted() -> tuple[float, float]:
        now = metric(driver, "predict", **requests), metric(driver, "predict", **scored)
        return now[0] - before[0], now[1] - before[1]

    # Counted in batches: a worker other than the one answering /metrics adds its within 0.5 s.
    wait_for(lambda: counted() == (5, 8) or None, 5, "5 requests and 8 ads counted")
    # onnxruntime calls are timed (the batch; single ads of a linear model take ~1 µs).
    assert metric(driver, "predict", "moderation_inference_seconds_count") >= 1

    # Every task this stack completed is counted once (tasks of earlier tests may still be
    # finishing: the count is compared with the database's, not with a count taken before).
    completed = {"name": "moderation_tasks_total", "outcome": "completed"}
    driver.wait_finished(driver.accept(ad["item_id"]))

    def consumer_matches_database() -> bool | None:
        (row,) = driver.execute(
            "SELECT count(*) FROM moderation_results WHERE status = 'completed'"
        )
        return metric(driver, "moderation_consumer", **completed) == row[0] or None

    wait_for(consumer_matches_database, 10, "completed tasks counted once each")
    assert metric(driver, "moderation_consumer", "moderation_task_completion_age_seconds_count")
    assert metric(driver, "adapter", "moderation_adapter_deliveries_total", result="delivered")


def test_async_task_completes_with_the_same_probability_as_predict(driver: Driver) -> None:
    ad = insert_ad(driver.database_url, is_verified_seller=False, images_qty=1)
    task_id = driver.accept(ad["item_id"])
    result = driver.wait_finished(task_id)
    expected = driver.http.post("/predict", json=ad).json()
    assert result["status"] == "completed"
    assert result["probability"] == expected["probability"]
    assert result["is_violation"] == expected["is_violation"]
    assert result["model_version"] == expected["model_version"]
    assert result["error_message"] is None and result["processed_at"] is not None


def test_two_pending_tasks_of_one_item_complete_independently(driver: Driver) -> None:
    ad = insert_ad(driver.database_url)
    first, second = driver.accept(ad["item_id"]), driver.accept(ad["item_id"])
    assert first != second
    assert driver.wait_finished(first)["status"] == "completed"
    assert driver.wait_finished(second)["status"] == "completed"


def test_unknown_item_is_404(driver: Driver) -> None:
    response = driver.http.post("/async_predict", params={"item_id": 2_000_000_003})
    assert response.status_code == 404


def test_crash_between_commit_and_publish_is_published_by_the_relay(
    driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    ad = insert_ad(driver.database_url)
    task_id = accept_without_publishing(driver, ad["item_id"], monkeypatch)
    assert driver.execute("SELECT published_at FROM outbox WHERE task_id = %s", (task_id,)) == [
        (None,)
    ]
    assert driver.wait_finished(task_id)["status"] == "completed"
    (published,) = driver.execute("SELECT published_at FROM outbox WHERE task_id = %s", (task_id,))
    assert published[0] is not None


def test_item_deleted_after_accept_fails_the_task_with_one_dead_letter(
    driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    ad = insert_ad(driver.database_url)
    task_id = accept_without_publishing(driver, ad["item_id"], monkeypatch)
    driver.execute("DELETE FROM advertisements WHERE id = %s", (ad["item_id"],))
    result = driver.wait_finished(task_id)
    assert result["status"] == "failed"
    assert "not found" in result["error_message"]
    assert result["error"] == result["error_message"]
    (letter,) = driver.dead_letters(task_id, expect=1)
    assert letter["error_class"] == "permanent"
    assert letter["retry_count"] == 0
    assert driver.task_row(task_id)["attempts"] == 1


def test_poison_messages_go_to_dlq_and_the_adapter_keeps_going(driver: Driver) -> None:
    marker = f"poison-{time.monotonic_ns()}".encode()
    driver.produce(b"{not json " + marker)
    driver.produce(b'{"no_item_id": "' + marker + b'"}')
    # Work behind the poison in the same topic is still done.
    ad = insert_ad(driver.database_url)
    assert driver.wait_finished(driver.accept(ad["item_id"]))["status"] == "completed"
    letters = wait_for(
        lambda: [d for d in driver.dead_letters() if marker.decode() in d["raw_payload"]],
        15,
        "both poison records in the DLQ",
    )
    assert len(letters) == 2
    raw = sorted(letter["raw_payload"] for letter in letters)
    assert raw[1] == (b"{not json " + marker).decode()
    assert all(letter["origin_topic"] == "moderation" for letter in letters)


def test_duplicate_delivery_of_a_finished_task_changes_nothing(driver: Driver) -> None:
    ad = insert_ad(driver.database_url)
    task_id = driver.accept(ad["item_id"])
    before = driver.wait_finished(task_id)
    driver.execute("UPDATE advertisements SET images_qty = 9 WHERE id = %s", (ad["item_id"],))
    duplicate = {"item_id": ad["item_id"], "task_id": task_id, "retry_count": 0}
    driver.produce(orjson.dumps(duplicate), key=str(ad["item_id"]).encode())
    # A later request for the same item shows the duplicate has been handled by then.
    later = driver.accept(ad["item_id"])
    driver.wait_finished(later)
    assert driver.result(task_id) == before
    assert driver.dead_letters(task_id) == []


def test_200_tasks_all_finish_none_lost_none_duplicated(driver: Driver) -> None:
    ads = [insert_ad(driver.database_url, images_qty=i % 10) for i in range(20)]
    items = [ads[i % len(ads)]["item_id"] for i in range(200)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        task_ids = list(pool.map(driver.accept, items))
    assert len(set(task_ids)) == 200

    def all_finished() -> bool:
        (count,) = driver.execute(
            "SELECT count(*) FROM moderation_results WHERE id = ANY(%s) AND status <> 'pending'",
            (task_ids,),
        )[0]
        return count == 200

    wait_for(all_finished, 60, "200 tasks to finish", interval=0.2)
    rows = driver.execute(
        "SELECT status, attempts FROM moderation_results WHERE id = ANY(%s)", (task_ids,)
    )
    assert sorted(set(rows)) == [("completed", 1)]
    # No task was made twice: exactly these 200 exist for these items.
    (count,) = driver.execute(
        "SELECT count(*) FROM moderation_results WHERE item_id = ANY(%s)",
        ([ad["item_id"] for ad in ads],),
    )[0]
    assert count == 200


def produce_all(driver: Driver, records: list[tuple[bytes, list]], key: bytes) -> list[tuple]:
    """Produce in order on one partition; returns each record's (partition, offset)."""
    from confluent_kafka import Producer

    from shared.kafka_admin import producer_config

    placed: list[tuple[int, int]] = []
    producer = Producer(producer_config(driver.bootstrap_servers))
    for value, headers in records:
        producer.produce(
            "moderation", value=value, key=key, headers=headers,
            on_delivery=lambda error, msg: placed.append((msg.partition(), msg.offset())),
        )  # fmt: skip
    assert producer.flush(10) == 0
    return placed


# No value that could name a real item (a small positive int, or true, which reads as 1): such
# a record is a valid seed request, completed rather than dead-lettered.
record_values = st.binary(max_size=100) | st.dictionaries(
    st.sampled_from(["item_id", "task_id", "retry_count", "timestamp"]),
    st.none()
    | st.just(False)
    | st.integers(-(2**70), 0)
    | st.integers(2**31, 2**70)
    | st.text(max_size=10),
).map(lambda data: json.dumps(data).encode())
record_headers = st.lists(
    st.tuples(
        st.sampled_from(["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_dueat",
                         "ce_Bad", "ce_", "content-type", "other"])
        | st.text(max_size=10),
        st.none() | st.binary(max_size=30) | st.just(b"x" * 9000),
    ),
    max_size=5,
)  # fmt: skip


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(record_values, record_headers), min_size=1, max_size=8))
def test_any_records_through_the_adapter_are_dead_lettered_and_the_work_behind_goes_on(
    driver: Driver, records: list[tuple[bytes, list]]
) -> None:
    """Whatever records come before it on its partition, a real task behind them completes,
    and each of them is in the dead-letter topic with its origin, within seconds."""
    ad = insert_ad(driver.database_url)
    (row,) = driver.execute(
        "INSERT INTO moderation_results (item_id) VALUES (%s) RETURNING id", (ad["item_id"],)
    )
    task = orjson.dumps({"item_id": ad["item_id"], "task_id": row[0], "retry_count": 0})
    key = f"generated-{time.monotonic_ns()}".encode()
    *placed, _ = produce_all(driver, [*records, (task, [])], key)
    row = wait_for(
        lambda: (r := driver.task_row(row[0]))["status"] != "pending" and r, 30, "the real task"
    )
    assert row["status"] == "completed"
    origins = wait_for(
        lambda: set(placed)
        <= (found := {(d["origin_partition"], d["origin_offset"]) for d in driver.dead_letters()
                      if d["origin_topic"] == "moderation"})
        and found,
        15,
        "every generated record in the dead-letter topic",
    )  # fmt: skip
    assert set(placed) <= origins
