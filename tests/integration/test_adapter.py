"""The push adapter against the real broker and a real HTTP sink: order, redelivery, due times."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from moderation.adapter import TopicPusher
from shared.kafka_admin import producer_config
from tests.conftest import Topics
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


class Sink:
    """An HTTP sink that fails the first `failures` requests with 503, rejects a body equal
    to `reject` with 400 and fails on a body equal to `crash` with 500; it records what it
    accepts."""

    def __init__(
        self, failures: int = 0, reject: bytes | None = None, crash: bytes | None = None
    ) -> None:
        self.failures = failures
        self.received: list[tuple[float, dict[str, str], bytes]] = []
        self.attempts = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                sink.attempts += 1
                if sink.attempts <= sink.failures:
                    self.send_response(503)
                elif body == reject:
                    self.send_response(400)
                elif body == crash:
                    self.send_response(500)
                else:
                    sink.received.append((time.monotonic(), dict(self.headers), body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def push(kafka_topics: Topics) -> Iterator:
    """push(sink, topic=moderation, group="g-<topic>", **options): a TopicPusher delivering to
    the sink, in a thread; stopped, and its sink closed, after the test."""
    started: list[tuple[TopicPusher, threading.Thread, Sink]] = []

    def start(sink: Sink, topic: str | None = None, **options: Any) -> TopicPusher:
        topic = topic or kafka_topics.moderation
        group = options.pop("group", f"g-{topic}")
        pusher = TopicPusher(kafka_topics.bootstrap_servers, topic, group, sink_url=sink.url,
                             **options)  # fmt: skip
        thread = threading.Thread(target=pusher.run, name="pusher", daemon=True)
        thread.start()
        started.append((pusher, thread, sink))
        return pusher

    yield start
    for pusher, thread, sink in started:
        pusher.stop()
        thread.join(10)
        sink.close()


def produce(topics: Topics, topic: str, values: list[bytes], headers: list | None = None) -> None:
    producer = Producer(producer_config(topics.bootstrap_servers))
    for value in values:
        producer.produce(topic, value=value, key=b"same-key", headers=headers or [])
    assert producer.flush(10) == 0


def test_adapter_redelivers_a_failed_record_and_keeps_partition_order(
    kafka_topics: Topics, push
) -> None:
    sink = Sink(failures=3)
    push(sink, backoff_initial=0.05)
    produce(kafka_topics, kafka_topics.moderation, [b'{"n": %d}' % i for i in range(5)])
    wait_for(lambda: len(sink.received) >= 5, 30, "five deliveries")
    time.sleep(0.5)  # anything extra would show up now
    bodies = [body for _, _, body in sink.received]
    assert bodies == [b'{"n": %d}' % i for i in range(5)]  # nothing skipped, in order
    assert sink.attempts == 8  # 3 refusals of the first record, then 5 deliveries
    headers = sink.received[0][1]
    assert headers["ce-type"] == "dev.knative.kafka.event"


def test_adapter_commits_only_delivered_records(kafka_topics: Topics, push) -> None:
    group = f"g-{kafka_topics.moderation}"
    first_sink = Sink()
    first = push(first_sink, group=group)
    produce(kafka_topics, kafka_topics.moderation, [b"a", b"b"])
    wait_for(lambda: len(first_sink.received) == 2, 30, "two deliveries")
    first.stop()
    time.sleep(1)
    second_sink = Sink()
    push(second_sink, group=group)
    produce(kafka_topics, kafka_topics.moderation, [b"c"])
    wait_for(lambda: second_sink.received, 30, "the third delivery")
    time.sleep(1)
    assert [body for _, _, body in second_sink.received] == [b"c"]


def test_adapter_holds_a_retry_until_its_due_time(kafka_topics: Topics, push) -> None:
    sink = Sink()
    push(sink, topic=kafka_topics.retry, honour_due_time=True)
    due = datetime.now(UTC) + timedelta(seconds=2)
    sent = time.monotonic()
    produce(
        kafka_topics, kafka_topics.retry, [b"{}"],
        headers=[("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_type", b"t"),
                 ("ce_source", b"/s"), ("ce_dueat", due.isoformat().encode())],
    )  # fmt: skip
    wait_for(lambda: sink.received, 30, "the retry")
    delivered_at, headers, _ = sink.received[0]
    assert delivered_at - sent >= 1.5
    assert headers["ce-dueat"] == due.isoformat()


def test_adapter_dead_letters_a_rejected_record_and_goes_on(kafka_topics: Topics, push) -> None:
    sink = Sink(reject=b"reject")
    push(sink, dead_letter_topic=kafka_topics.dlq)
    produce(kafka_topics, kafka_topics.moderation, [b"reject", b"fine"])
    wait_for(lambda: sink.received, 30, "the record behind the rejected one")
    assert [body for _, _, body in sink.received] == [b"fine"]
    (letter,) = kafka_topics.read(kafka_topics.dlq, expect=1)
    value = orjson.loads(letter.value())
    assert value["raw_payload"] == "reject"
    assert "HTTP 400" in value["error"]
    assert (value["origin_topic"], value["origin_offset"]) == (kafka_topics.moderation, 0)


def test_adapter_delivers_records_with_binary_and_non_latin_keys(
    kafka_topics: Topics, push
) -> None:
    sink = Sink()
    push(sink)
    producer = Producer(producer_config(kafka_topics.bootstrap_servers))
    producer.produce(kafka_topics.moderation, value=b"1", key=b"\x00\x00\x00\x05")
    producer.produce(kafka_topics.moderation, value=b"2", key="объявление".encode())
    assert producer.flush(10) == 0
    wait_for(lambda: len(sink.received) == 2, 30, "both records")
    keys = sorted(headers["ce-key"] for _, headers, _ in sink.received)
    assert keys == [
        "%00%00%00%05",
        "%D0%BE%D0%B1%D1%8A%D1%8F%D0%B2%D0%BB%D0%B5%D0%BD%D0%B8%D0%B5",
    ]


def test_adapter_dead_letters_a_record_the_sink_keeps_failing_on_and_goes_on(
    kafka_topics: Topics, push
) -> None:
    sink = Sink(crash=b"crash")
    push(
        sink,
        dead_letter_topic=kafka_topics.dlq,
        backoff_initial=0.01,
        backoff_max=0.05,
        max_server_errors=4,
    )
    produce(kafka_topics, kafka_topics.moderation, [b"crash", b"fine"])
    wait_for(lambda: sink.received, 30, "the record behind the one the sink fails on")
    assert [body for _, _, body in sink.received] == [b"fine"]
    assert sink.attempts == 5  # four 500s, then the next record
    (letter,) = kafka_topics.read(kafka_topics.dlq, expect=1)
    value = orjson.loads(letter.value())
    assert value["raw_payload"] == "crash"
    assert value["error"] == "the sink failed on the record 4 times: HTTP 500"


def test_adapter_dead_letters_a_record_with_a_bad_cloudevent_header_and_goes_on(
    kafka_topics: Topics, push
) -> None:
    sink = Sink()
    push(sink, dead_letter_topic=kafka_topics.dlq)
    producer = Producer(producer_config(kafka_topics.bootstrap_servers))
    for headers in (
        [("ce_specversion", b"1.0"), ("ce_Bad Name\n", b"x")],
        [("ce_specversion", b"1.0"), ("ce_id", b"x" * 20_000)],
    ):
        producer.produce(kafka_topics.moderation, value=b"bad", key=b"k", headers=headers)
    producer.produce(kafka_topics.moderation, value=b"fine", key=b"k")
    assert producer.flush(10) == 0
    wait_for(lambda: sink.received, 30, "the record behind the bad ones")
    assert [body for _, _, body in sink.received] == [b"fine"]
    letters = sorted(
        (orjson.loads(r.value()) for r in kafka_topics.read(kafka_topics.dlq, expect=2)),
        key=lambda letter: letter["origin_offset"],
    )
    assert [letter["origin_offset"] for letter in letters] == [0, 1]
    assert "invalid CloudEvent attribute name" in letters[0]["error"]
    assert "over 8192" in letters[1]["error"]


def test_adapter_stopped_right_after_a_delivery_has_committed_it(
    kafka_topics: Topics, push
) -> None:
    from confluent_kafka import Consumer, TopicPartition

    from shared.kafka_admin import consumer_config

    group = f"g-{kafka_topics.moderation}"
    sink = Sink()
    pusher = push(sink, group=group)
    produce(kafka_topics, kafka_topics.moderation, [b"%d" % n for n in range(30)])
    wait_for(lambda: len(sink.received) == 30, 30, "thirty deliveries")
    pusher.stop()  # at once: the last commits are still on their way
    pushers = [t for t in threading.enumerate() if t.name == "pusher"]
    wait_for(lambda: not any(t.is_alive() for t in pushers), 10, "the pusher to stop")
    partition = int(sink.received[-1][1]["ce-kafkapartition"])
    consumer = Consumer(consumer_config(kafka_topics.bootstrap_servers, group))
    try:
        (committed,) = consumer.committed(
            [TopicPartition(kafka_topics.moderation, partition)], timeout=10
        )
    finally:
        consumer.close()
    assert committed.offset == 30
