"""Driving a running dev stack from tests: HTTP calls, database reads, raw Kafka records."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import psycopg
from psycopg.rows import dict_row

from moderation.dev.stack import DevStack
from shared.kafka_admin import producer_config
from tests.conftest import read_topic
from tests.helpers import free_port, wait_for

# Quick retries and short waits, so outages play out in seconds.
TEST_ENV = {
    "RETRY_BACKOFF_BASE_SECONDS": "0.3",
    "RETRY_BACKOFF_MAX_SECONDS": "2",
    "DATABASE_TIMEOUT": "1",
    "PUBLISH_WAIT_SECONDS": "0.5",
    "RELAY_GRACE_SECONDS": "1",
    "WORKERS": "1",
}


@contextmanager
def running_stack() -> Iterator[Driver]:
    """A whole dev stack of its own (embedded servers), stopped afterwards."""
    stack = DevStack(port=free_port(), quiet=True, extra_env=TEST_ENV)
    try:
        stack.start()
        yield Driver(stack)
    finally:
        stack.stop()


class Driver:
    def __init__(self, stack: DevStack) -> None:
        self.stack = stack
        self.http = httpx.Client(base_url=stack.urls["gateway"], timeout=30)

    @property
    def database_url(self) -> str:
        assert self.stack.database_url
        return self.stack.database_url

    @property
    def bootstrap_servers(self) -> str:
        assert self.stack.kafka_bootstrap_servers
        return self.stack.kafka_bootstrap_servers

    def accept(self, item_id: int) -> int:
        response = self.http.post("/async_predict", params={"item_id": item_id})
        assert response.status_code == 200, response.text
        return int(response.json()["task_id"])

    def result(self, task_id: int) -> dict[str, Any]:
        response = self.http.get(f"/moderation/moderation_result/{task_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait_finished(self, task_id: int, timeout: float = 30) -> dict[str, Any]:
        return wait_for(
            lambda: (r := self.result(task_id))["status"] != "pending" and r,
            timeout,
            f"task {task_id} to finish",
        )

    def task_row(self, task_id: int) -> dict[str, Any]:
        with psycopg.connect(self.database_url, row_factory=dict_row) as conn:
            row = conn.execute(
                "SELECT * FROM moderation_results WHERE id = %s", (task_id,)
            ).fetchone()
        assert row is not None
        return row

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.database_url) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def produce(self, value: bytes, key: bytes | None = None, topic: str = "moderation") -> None:
        from confluent_kafka import Producer

        producer = Producer(producer_config(self.bootstrap_servers))
        producer.produce(topic, value=value, key=key)
        assert producer.flush(10) == 0, "record not delivered"

    def dead_letters(self, task_id: int | None = None, expect: int = 0) -> list[dict[str, Any]]:
        letters = [
            orjson.loads(r.value())
            for r in read_topic(self.bootstrap_servers, "moderation_dlq", timeout=5)
        ]
        if task_id is not None:
            letters = [letter for letter in letters if letter.get("task_id") == task_id]
        return letters
