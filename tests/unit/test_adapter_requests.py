"""Whatever a Kafka record holds, the adapter makes an HTTP request of it that any HTTP client
and server accept, or says why it cannot (and the record is dead-lettered); never an exception
that would stop its partition."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moderation.adapter import MAX_HEADER_BYTES, cloudevent_request, due_time


@dataclass
class Record:
    """What the adapter reads of a confluent_kafka.Message."""

    value_: bytes | None
    key_: bytes | None
    headers_: list[tuple[str, bytes | None]] | None
    offset_: int = 7

    def value(self) -> bytes | None:
        return self.value_

    def key(self) -> bytes | None:
        return self.key_

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        return self.headers_

    def topic(self) -> str:
        return "moderation"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self.offset_

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)


header_names = st.one_of(
    st.sampled_from(["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_dueat",
                     "content-type", "traceparent"]),
    st.text(max_size=30).map(lambda name: f"ce_{name}"),
    st.text(max_size=30),
)  # fmt: skip
header_values = st.one_of(
    st.none(),
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.binary(min_size=9000, max_size=9000),
)
records = st.builds(
    Record,
    st.one_of(st.none(), st.binary(max_size=500)),
    st.one_of(st.none(), st.binary(max_size=50)),
    st.one_of(st.none(), st.lists(st.tuples(header_names, header_values), max_size=8)),
)


def _printable(text: str) -> bool:
    return all(" " <= c <= "~" for c in text)


@given(records)
def test_any_record_gives_a_valid_http_request_or_a_reason(record: Record) -> None:
    try:
        headers, body = cloudevent_request(record, "/test")
    except ValueError as reason:
        assert str(reason)
        return
    request = httpx.Request("POST", "http://sink/", headers=headers, content=body)
    assert request.content == (record.value() or b"")
    assert all(_printable(name) and _printable(value) for name, value in headers.items())
    assert sum(len(name) + len(value) for name, value in headers.items()) <= MAX_HEADER_BYTES
    assert headers["ce-kafkaoffset"] == "7"
    if not any(name == "ce_specversion" for name, _ in record.headers() or []):
        assert headers["ce-type"] == "dev.knative.kafka.event"  # wrapped like KafkaSource


@given(records)
def test_any_record_has_a_due_time_or_none(record: Record) -> None:
    due = due_time(record)
    assert due is None or due.tzinfo is not None


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([("ce_specversion", b"1.0"), ("ce_Bad Name", b"x")], "invalid CloudEvent attribute"),
        ([("ce_specversion", b"1.0"), ("ce_\u00e9", b"x")], "invalid CloudEvent attribute"),
        ([("ce_specversion", b"1.0"), ("ce_big", b"x" * 9000)], "over 8192"),
        ([("content-type", b"x" * 9000)], "over 8192"),
    ],
)
def test_a_record_that_cannot_be_a_cloudevent_says_why(headers: list, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        cloudevent_request(Record(b"{}", None, headers), "/test")


@pytest.mark.parametrize("value", [b"not a time", b"\xff\xfe", b"", None])
def test_a_due_time_that_is_not_a_time_means_at_once(value: Any) -> None:
    assert due_time(Record(b"{}", None, [("ce_dueat", value)])) is None


def test_a_far_due_time_is_cut_to_the_longest_backoff() -> None:
    from datetime import UTC, datetime, timedelta

    due = due_time(Record(b"{}", None, [("ce_dueat", b"9999-12-31T23:59:59-23:59")]))
    assert due is not None
    assert due <= datetime.now(UTC) + timedelta(seconds=61)


class IdleConsumer:
    """A consumer whose group never hands it a partition, on a topic of `partitions`."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions

    def poll(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.01))

    def assignment(self) -> list:
        return []

    def position(self, partitions: list) -> list:
        return []

    def list_topics(self, timeout: float) -> Any:
        from types import SimpleNamespace

        topic = SimpleNamespace(partitions=dict.fromkeys(range(self.partitions)), error=None)
        return SimpleNamespace(topics={"moderation": topic}, cluster_id="a-real-kafka")


@pytest.mark.parametrize(("partitions", "rejoins"), [(4, True), (2, False)])
def test_a_pusher_left_without_partitions_joins_again_unless_it_is_a_spare(
    monkeypatch: pytest.MonkeyPatch, partitions: int, rejoins: bool
) -> None:
    """Four pushers, so each should own one of four partitions: none for a while means the
    group is stuck. With two partitions, two pushers are spares and stay."""
    import threading

    from moderation import adapter

    monkeypatch.setattr(adapter, "STUCK_AFTER_SECONDS", 0.5)
    pusher = adapter.TopicPusher("unused:9092", "moderation", "g", sink_url="http://unused",
                                 group_size=4)  # fmt: skip
    timer = threading.Timer(4.0, pusher.stop)  # a spare consumes until it is stopped
    timer.start()
    try:
        pusher.consume(IdleConsumer(partitions))
        # Returned by itself (to join again), or because it was stopped.
        returned_by_itself = not pusher._stop.is_set()
    finally:
        timer.cancel()
    assert returned_by_itself is rejoins


def test_one_pusher_at_a_time_mends_a_stuck_group_joining_again_then_resetting_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moderation import adapter

    monkeypatch.setattr(adapter, "STUCK_AFTER_SECONDS", 20.0)
    groups = adapter.StuckGroups()
    assert groups.claim("g", 100.0) == "rejoin"
    assert groups.claim("g", 101.0) is None  # the others wait and see
    assert groups.claim("other", 101.0) == "rejoin"  # groups are mended apart
    assert groups.claim("g", 121.0) == "reset"  # joining again did not help
    assert groups.claim("g", 142.0) == "rejoin"
    groups.mended("g")  # a pusher got a partition: start over
    assert groups.claim("g", 163.0) == "rejoin"


def test_offsets_kept_through_a_reset_are_applied_once_and_not_for_long() -> None:
    from moderation import adapter

    groups = adapter.StuckGroups()
    groups.keep("g", {("t", 0): 5, ("t", 1): 7}, now=10.0)
    assert groups.kept("g", ("t", 0), now=11.0) == 5
    assert groups.kept("g", ("t", 0), now=12.0) is None  # its own commits say where it is now
    assert groups.kept("g", ("t", 1), now=10.0 + groups.KEEP_SECONDS + 1) is None
