"""Fixtures shared by every test layer: settings isolation, the real embedded PostgreSQL."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING
from functions_framework import create_app
from hypothesis import settings
from starlette.testclient import TestClient

from moderation.dev.embedded_kafka import CLIENT_TUNING, EmbeddedKafka
from moderation.dev.embedded_postgres import EmbeddedPostgres
from moderation.migrate import apply_migrations
from shared import config, db, kafka, model
from shared.kafka_admin import consumer_config, ensure_topics

if not os.environ.get("TEST_KAFKA_BOOTSTRAP_SERVERS"):
    # Every Kafka client of the tests, and of the processes they start, talks to an embedded
    # broker: give them its tuning, as `moderation dev` gives it to its children.
    os.environ.update(CLIENT_TUNING)

# Property-based tests draw the same examples on every run: CI stays reproducible, and a
# failure shows the same input again. (HYPOTHESIS_PROFILE=explore draws new ones.)
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO_ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = REPO_ROOT / "functions"


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test reads settings and loads the model anew, as a fresh process would."""
    for name in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "MODEL_PATH", "MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)
    # Retries come quickly in tests; the backoff itself is tested on its own.
    monkeypatch.setenv("RETRY_BACKOFF_BASE_SECONDS", "0.1")
    config.get_settings.cache_clear()
    model.reset()
    yield
    kafka.reset()
    config.get_settings.cache_clear()
    model.reset()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL with the schema applied: TEST_DATABASE_URL, or an embedded one."""
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        apply_migrations(external)
        yield external
        return
    with EmbeddedPostgres() as server:
        apply_migrations(server.url)
        yield server.url


@pytest.fixture
def database_url(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The real database, configured for the function under test."""
    monkeypatch.setenv("DATABASE_URL", postgres_url)
    config.get_settings.cache_clear()
    return postgres_url


@pytest.fixture
def disposable_postgres(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbeddedPostgres]:
    """A server of this test's own, configured for the code under test, so that stopping it
    (an outage) disturbs no other test."""
    with EmbeddedPostgres() as server:
        apply_migrations(server.url)
        monkeypatch.setenv("DATABASE_URL", server.url)
        monkeypatch.setenv("DATABASE_TIMEOUT", "1")
        config.get_settings.cache_clear()
        yield server


def insert_ad(
    database_url: str,
    *,
    is_verified_seller: bool = False,
    images_qty: int = 0,
    description: str = "Test Description",
    category: int = 1,
    name: str = "Test Item",
) -> dict[str, Any]:
    """A new seller and ad with fresh ids; returns the ad as the API would describe it."""
    with psycopg.connect(database_url) as conn:
        (seller_id,) = conn.execute(
            "INSERT INTO users (is_verified_seller) VALUES (%s) RETURNING id",
            (is_verified_seller,),
        ).fetchone()  # type: ignore[misc]
        (item_id,) = conn.execute(
            "INSERT INTO advertisements (seller_id, name, description, category, images_qty)"
            " VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (seller_id, name, description, category, images_qty),
        ).fetchone()  # type: ignore[misc]
    return {
        "seller_id": seller_id,
        "is_verified_seller": is_verified_seller,
        "item_id": item_id,
        "name": name,
        "description": description,
        "category": category,
        "images_qty": images_qty,
    }


def function_client(target: str) -> TestClient:
    app = create_app(target=target, source=str(FUNCTIONS / target / "main.py"))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def make_client() -> Iterator[Callable[[str], TestClient]]:
    """Open a function's test client; its pool is closed on its own event loop afterwards."""
    opened: list[TestClient] = []

    def make(target: str) -> TestClient:
        client = function_client(target)
        client.__enter__()
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.portal.call(db.close)  # type: ignore[union-attr]
        client.__exit__(None, None, None)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """A real Kafka-protocol broker: TEST_KAFKA_BOOTSTRAP_SERVERS, or an embedded Tansu."""
    external = os.environ.get("TEST_KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    with EmbeddedKafka() as broker:
        yield broker.bootstrap_servers


@dataclass(frozen=True)
class Topics:
    bootstrap_servers: str
    moderation: str
    retry: str
    dlq: str

    def read(self, topic: str, expect: int = 0, timeout: float = 10.0) -> list[Any]:
        return read_topic(self.bootstrap_servers, topic, expect=expect, timeout=timeout)


@pytest.fixture
def kafka_topics(kafka_broker: str, monkeypatch: pytest.MonkeyPatch) -> Topics:
    """Topics of this test's own on the real broker, configured for the code under test."""
    suffix = uuid.uuid4().hex[:10]
    topics = Topics(
        kafka_broker,
        f"moderation-{suffix}",
        f"moderation_retry-{suffix}",
        f"moderation_dlq-{suffix}",
    )
    ensure_topics(kafka_broker, {topics.moderation: 2, topics.retry: 2, topics.dlq: 2})
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_broker)
    monkeypatch.setenv("MODERATION_TOPIC", topics.moderation)
    monkeypatch.setenv("RETRY_TOPIC", topics.retry)
    monkeypatch.setenv("DLQ_TOPIC", topics.dlq)
    config.get_settings.cache_clear()
    return topics


def read_topic(
    bootstrap_servers: str, topic: str, expect: int = 0, timeout: float = 10.0
) -> list[Any]:
    """Every record of a topic, read from the start with assign() (no group join).

    Waits until at least `expect` records arrived, then a little longer so that an unexpected
    extra record is seen too; never longer than `timeout`.
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**consumer_config(bootstrap_servers, f"test-reader-{uuid.uuid4().hex}")})
    try:
        metadata = consumer.list_topics(topic, timeout=5)
        partitions = metadata.topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        quiet_until = None
        while time.monotonic() < deadline:
            message = consumer.poll(0.1)
            if message is not None and not message.error():
                records.append(message)
                continue
            if len(records) >= expect:
                quiet_until = quiet_until or time.monotonic() + 0.5
                if time.monotonic() > quiet_until:
                    break
        return records
    finally:
        consumer.close()
