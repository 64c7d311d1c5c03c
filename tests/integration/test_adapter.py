"""The push adapter against the real broker and a real HTTP sink: order, redelivery, due times."""

from __future__ import annotations

import base64
import os
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


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class Served:
    """An HTTP server on a free port, serving in a thread until close()."""

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


class Sink(Served):
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

        class Handler(QuietHandler):
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

        self.serve(Handler)


class BatchSink(Served):
    """A sink that also takes CloudEvents batches, answering a result per event: 503 for an
    event whose data is in `fail_once` the first time, 200 otherwise. With `refuse`, it
    answers every batch that way instead (a sink that takes no batches, or a broken answer).
    It records each delivery as (mode, body), mode "batch" or "alone", and each batch's size."""

    def __init__(
        self, fail_once: frozenset[bytes] = frozenset(), refuse: tuple[int, bytes] | None = None
    ) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.batches: list[int] = []
        self.events: list[dict[str, Any]] = []
        self.refused = 0
        pending_failures = set(fail_once)
        sink = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers["content-type"] != "application/cloudevents-batch+json":
                    sink.received.append(("alone", body))
                    self.answer(200, b"{}")
                    return
                if refuse is not None:
                    sink.refused += 1
                    self.answer(*refuse)
                    return
                events = orjson.loads(body)
                sink.batches.append(len(events))
                results = []
                for event in events:
                    data = base64.b64decode(event["data_base64"])
                    if data in pending_failures:
                        pending_failures.discard(data)
                        results.append({"id": event["id"], "status": 503})
                    else:
                        sink.received.append(("batch", data))
                        sink.events.append(event)
                        results.append({"id": event["id"], "status": 200})
                self.answer(200, orjson.dumps({"results": results}))

            def answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.serve(Handler)


@pytest.fixture
def push(kafka_topics: Topics) -> Iterator:
    """push(sink, topic=moderation, group="g-<topic>", **options): a TopicPusher delivering to
    the sink, in a thread; stopped, and its sink closed, after the test."""
    started: list[tuple[TopicPusher, threading.Thread, Sink | BatchSink]] = []

    def start(sink: Sink | BatchSink, topic: str | None = None, **options: Any) -> TopicPusher:
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
    group = f"g-{kafka_topics.moderation}"
    sink = Sink()
    pusher = push(sink, group=group)
    produce(kafka_topics, kafka_topics.moderation, [b"%d" % n for n in range(30)])
    wait_for(lambda: len(sink.received) == 30, 30, "thirty deliveries")
    pusher.stop()  # at once: the last commits are still on their way
    pushers = [t for t in threading.enumerate() if t.name == "pusher"]
    wait_for(lambda: not any(t.is_alive() for t in pushers), 10, "the pusher to stop")
    partition = int(sink.received[-1][1]["ce-kafkapartition"])
    assert committed_offset(kafka_topics, group, partition) == 30


def committed_offset(topics: Topics, group: str, partition: int) -> int:
    from confluent_kafka import Consumer, TopicPartition

    from shared.kafka_admin import consumer_config

    consumer = Consumer(consumer_config(topics.bootstrap_servers, group))
    try:
        wanted = [TopicPartition(topics.moderation, partition)]
        (committed,) = consumer.committed(wanted, timeout=10)
    finally:
        consumer.close()
    return committed.offset


def numbered(count: int) -> list[bytes]:
    return [b'{"n": %d}' % n for n in range(count)]


def test_adapter_pushes_records_already_fetched_together_in_partition_order(
    kafka_topics: Topics, push
) -> None:
    produce(kafka_topics, kafka_topics.moderation, numbered(40))  # all there before it starts
    sink = BatchSink()
    pusher = push(sink, batch_size=16)
    wait_for(lambda: len(sink.received) == 40, 30, "forty deliveries")
    assert [body for _, body in sink.received] == numbered(40)
    assert max(sink.batches) == 16 and sum(sink.batches) == 40
    event = sink.events[0]
    assert event["type"] == "dev.knative.kafka.event"
    assert (event["kafkatopic"], event["kafkaoffset"]) == (kafka_topics.moderation, "0")
    partition = int(event["kafkapartition"])
    wait_for(lambda: pusher.delivered == 40, 10, "every delivery counted")
    pusher.stop()
    time.sleep(1)
    assert committed_offset(kafka_topics, f"g-{kafka_topics.moderation}", partition) == 40


def test_adapter_commits_a_batch_up_to_its_failed_event_and_delivers_from_there_alone(
    kafka_topics: Topics, push
) -> None:
    produce(kafka_topics, kafka_topics.moderation, numbered(10))
    sink = BatchSink(fail_once=frozenset({b'{"n": 3}'}))
    pusher = push(sink, batch_size=100, backoff_initial=0.05)
    wait_for(lambda: sink.received.count(("alone", b'{"n": 3}')) == 1, 30, "record 3 again")
    wait_for(lambda: pusher.delivered >= 10, 30, "ten deliveries")
    time.sleep(0.5)  # anything extra would show up now
    first_batch = [body for mode, body in sink.received[: sink.batches[0] - 1]]
    assert first_batch == [b for b in numbered(sink.batches[0]) if b != b'{"n": 3}']
    # From the failed event to the end of its batch, each record alone and in order; then
    # batches again.
    alone = [body for mode, body in sink.received if mode == "alone"]
    assert alone == numbered(sink.batches[0])[3:]
    assert {body for _, body in sink.received} == set(numbered(10))
    pusher.stop()
    time.sleep(1)
    partition = int(sink.events[0]["kafkapartition"])
    assert committed_offset(kafka_topics, f"g-{kafka_topics.moderation}", partition) == 10


@pytest.mark.parametrize(
    "refuse",
    [(415, b'{"detail": "Unsupported Media Type"}'), (200, b'{"outcome": "completed"}'),
     (503, b"")],
    ids=["unsupported", "no-results", "failing"],
)  # fmt: skip
def test_adapter_delivers_every_record_alone_when_a_batch_is_not_taken(
    kafka_topics: Topics, push, refuse: tuple[int, bytes]
) -> None:
    produce(kafka_topics, kafka_topics.moderation, numbered(10))
    sink = BatchSink(refuse=refuse)
    pusher = push(sink, batch_size=100)
    wait_for(lambda: pusher.delivered == 10, 30, "ten deliveries")
    assert sink.received == [("alone", body) for body in numbered(10)]
    if refuse[0] == 415:  # a sink that takes no batches is not offered another
        assert (sink.refused, pusher.batch_size) == (1, 1)


def produce_to(
    topics: Topics, partition: int, values: list[bytes], headers: list | None = None
) -> None:
    producer = Producer(producer_config(topics.bootstrap_servers))
    for value in values:
        producer.produce(topics.moderation, value=value, partition=partition, headers=headers)
    assert producer.flush(10) == 0


def test_adapter_rewinds_only_the_partition_whose_event_failed(kafka_topics: Topics, push) -> None:
    first = [b'{"p": 0, "n": %d}' % n for n in range(5)]
    second = [b'{"p": 1, "n": %d}' % n for n in range(5)]
    produce_to(kafka_topics, 0, first)
    produce_to(kafka_topics, 1, second)
    sink = BatchSink(fail_once=frozenset({first[2]}))
    pusher = push(sink, batch_size=100, backoff_initial=0.05)
    wait_for(lambda: pusher.delivered >= 10, 30, "ten deliveries")
    time.sleep(0.5)  # anything extra would show up now
    # The other partition: each record once, together. This one: from the failed record on,
    # alone and in order, after the records before it went together.
    assert [body for _, body in sink.received if body in second] == second
    assert [(mode, body) for mode, body in sink.received if body in first] == [
        ("batch", first[0]), ("batch", first[1]), ("batch", first[3]), ("batch", first[4]),
        ("alone", first[2]), ("alone", first[3]), ("alone", first[4]),
    ]  # fmt: skip
    pusher.stop()
    time.sleep(1)
    group = f"g-{kafka_topics.moderation}"
    assert [committed_offset(kafka_topics, group, p) for p in (0, 1)] == [5, 5]


def test_adapter_sends_a_partition_holding_a_record_it_cannot_push_alone_in_order(
    kafka_topics: Topics, push
) -> None:
    bad = [("ce_specversion", b"1.0"), ("ce_Bad Name", b"x")]
    produce_to(kafka_topics, 0, [b"before"])
    produce_to(kafka_topics, 0, [b"bad"], headers=bad)
    produce_to(kafka_topics, 0, [b"after"])
    second = [b"q%d" % n for n in range(4)]
    produce_to(kafka_topics, 1, second)
    sink = BatchSink()
    pusher = push(sink, batch_size=100, dead_letter_topic=kafka_topics.dlq)
    wait_for(lambda: pusher.delivered >= 6, 30, "six deliveries")
    time.sleep(0.5)
    assert [entry for entry in sink.received if entry[1] in (b"before", b"after")] == [
        ("alone", b"before"),
        ("alone", b"after"),
    ]
    assert [entry for entry in sink.received if entry[1] in second] == [
        ("batch", body) for body in second
    ]
    (letter,) = kafka_topics.read(kafka_topics.dlq, expect=1)
    assert orjson.loads(letter.value())["origin_offset"] == 1
    pusher.stop()
    time.sleep(1)
    group = f"g-{kafka_topics.moderation}"
    assert [committed_offset(kafka_topics, group, p) for p in (0, 1)] == [3, 4]


def test_adapter_mends_a_group_whose_members_all_left_at_once(
    kafka_topics: Topics, push, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four members leave about together (as an adapter's pushers do when it stops): the
    embedded broker can then keep a leader that is no longer a member, and fresh members never
    get a partition. The pushers mend it (join again, then reset the group), and the offsets
    committed before stay: nothing is pushed twice."""
    from confluent_kafka import Consumer, TopicPartition

    from moderation import adapter
    from shared.kafka_admin import consumer_config, ensure_topics

    if os.environ.get("TEST_KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("about the embedded broker's consumer groups")
    monkeypatch.setattr(adapter, "STUCK_AFTER_SECONDS", 3.0)
    servers = kafka_topics.bootstrap_servers
    topic, group = f"{kafka_topics.moderation}-four", f"g-left-at-once-{kafka_topics.moderation}"
    ensure_topics(servers, {topic: 4})
    producer = Producer(producer_config(servers))
    for partition in range(4):
        producer.produce(topic, value=b"old-%d" % partition, partition=partition)
    assert producer.flush(10) == 0
    keeper = Consumer(consumer_config(servers, group))  # the old records: consumed before
    keeper.commit(offsets=[TopicPartition(topic, p, 1) for p in range(4)], asynchronous=False)
    keeper.close()

    members = [Consumer(consumer_config(servers, group)) for _ in range(4)]
    for member in members:
        member.subscribe([topic])

    def all_assigned() -> bool:
        for member in members:
            member.poll(0.05)
        return all(member.assignment() for member in members)

    wait_for(all_assigned, 60, "a group of four, each with a partition")
    for member in members:  # about together, as Adapter.stop() closes its pushers
        member.close()
        time.sleep(0.1)

    sink = BatchSink()
    for _ in range(4):
        push(sink, topic=topic, group=group, group_size=4)
        time.sleep(0.15)
    for partition in range(4):
        producer.produce(topic, value=b"new-%d" % partition, partition=partition)
    assert producer.flush(10) == 0
    wait_for(lambda: len(sink.received) >= 4, 60, "the new records, through a mended group")
    time.sleep(1)  # anything extra would show up now
    assert sorted(body for _, body in sink.received) == [b"new-%d" % p for p in range(4)]
