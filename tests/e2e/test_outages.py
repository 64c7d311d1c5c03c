"""Outages of the database and the broker under the whole stack: nothing accepted is lost."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from tests.conftest import insert_ad, read_topic
from tests.e2e.stack import Driver, running_stack
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    with running_stack() as driver:
        yield driver


def pending_task(driver: Driver) -> tuple[int, int]:
    ad = insert_ad(driver.database_url)
    (row,) = driver.execute(
        "INSERT INTO moderation_results (item_id) VALUES (%s) RETURNING id", (ad["item_id"],)
    )
    return ad["item_id"], int(row[0])


def retries_of(driver: Driver, task_id: int, expect: int) -> list[dict]:
    records = read_topic(driver.bootstrap_servers, "moderation_retry", timeout=3)
    return [v for r in records if (v := orjson.loads(r.value())).get("task_id") == task_id]


def test_database_down_during_processing_is_retried_then_completed(driver: Driver) -> None:
    item_id, task_id = pending_task(driver)
    postgres = driver.stack.postgres
    assert postgres is not None
    postgres.stop()
    try:
        driver.produce(orjson.dumps({"item_id": item_id, "task_id": task_id, "retry_count": 0}))
        wait_for(lambda: retries_of(driver, task_id, 1), 20, "a first retry record")
    finally:
        postgres.start()
    row = wait_for(
        lambda: (r := driver.task_row(task_id))["status"] != "pending" and r, 30, "the task"
    )
    assert row["status"] == "completed"
    assert row["attempts"] >= 2
    assert driver.dead_letters(task_id) == []


def test_database_down_through_every_retry_fails_the_task_with_a_dead_letter(
    driver: Driver,
) -> None:
    item_id, task_id = pending_task(driver)
    postgres = driver.stack.postgres
    assert postgres is not None
    postgres.stop()
    try:
        driver.produce(orjson.dumps({"item_id": item_id, "task_id": task_id, "retry_count": 0}))
        (letter,) = wait_for(lambda: driver.dead_letters(task_id), 60, "the dead letter")
    finally:
        postgres.start()
    assert letter["retry_count"] == 3
    assert letter["error_class"] == "temporary"
    assert [r["retry_count"] for r in retries_of(driver, task_id, 3)] == [1, 2, 3]
    # The dead-letter recorder fails the task once the database is back.
    row = wait_for(
        lambda: (r := driver.task_row(task_id))["status"] != "pending" and r, 30, "the task"
    )
    assert row["status"] == "failed"
    assert "gave up after 3 retries" in row["error_message"]


def test_broker_down_at_accept_is_accepted_and_completed_after_it_is_back(driver: Driver) -> None:
    kafka = driver.stack.kafka
    assert kafka is not None
    ad = insert_ad(driver.database_url)
    kafka.stop()
    try:
        task_id = driver.accept(ad["item_id"])  # 200 although the broker is down
        assert driver.result(task_id)["status"] == "pending"
    finally:
        kafka.start()  # memory-only: comes back empty; the relay recreates the topics
    result = driver.wait_finished(task_id, timeout=60)
    assert result["status"] == "completed"
    # And the stack keeps working for new work after the outage.
    assert driver.wait_finished(driver.accept(ad["item_id"]), timeout=30)["status"] == "completed"
