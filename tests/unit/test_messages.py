"""The Kafka contract: records, dead letters, origins, backoff, and the adapter's CloudEvents."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from moderation.adapter import cloudevent_request, due_time
from shared.consumer import retry_delay
from shared.errors import InvalidMessage
from shared.messages import (
    Message,
    Origin,
    dead_letter_record,
    origin_of,
    parse_message,
    raw_bytes,
    retry_record,
)


@dataclass
class FakeRecord:
    """The few confluent_kafka.Message methods the adapter reads."""

    value_: bytes | None
    headers_: list[tuple[str, bytes]] = field(default_factory=list)
    key_: bytes | None = b"7"

    def topic(self) -> str:
        return "moderation"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return 41

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)

    def key(self) -> bytes | None:
        return self.key_

    def value(self) -> bytes | None:
        return self.value_

    def headers(self) -> list[tuple[str, bytes]]:
        return self.headers_


def test_parse_message_accepts_seed_format_without_task_id() -> None:
    message = parse_message(b'{"item_id": 7, "timestamp": "2024-01-01"}')
    assert (message.item_id, message.task_id, message.retry_count) == (7, None, 0)


@pytest.mark.parametrize(
    "raw", [b"", b"null", b"[]", b"{bad", b'{"item_id": 0}', b'{"item_id": 1, "retry_count": -1}']
)
def test_parse_message_rejects_what_cannot_be_a_request(raw: bytes) -> None:
    with pytest.raises(InvalidMessage):
        parse_message(raw)


def test_retry_record_counts_up_and_carries_its_due_time() -> None:
    due = datetime(2030, 1, 1, tzinfo=UTC)
    record = retry_record("r", Message(item_id=7, task_id=3, retry_count=1), 3, due)
    value = orjson.loads(record.value)
    assert (value["item_id"], value["task_id"], value["retry_count"]) == (7, 3, 2)
    assert record.key == "7"
    assert record.headers["ce_dueat"] == due.isoformat()
    assert record.headers["ce_id"] == "3-retry-2"


def test_retry_record_of_unresolved_seed_message_stays_in_seed_format() -> None:
    record = retry_record("r", Message(item_id=7), None, datetime.now(UTC))
    assert "task_id" not in orjson.loads(record.value)


def test_dead_letter_keeps_undecodable_payload_as_base64() -> None:
    raw = b"\xff\x00\xfe"
    letter = dead_letter_record(
        "dlq", raw=raw, error="bad", error_class="permanent", retry_count=0,
        origin=Origin("moderation", 1, 5), task_id=None, item_id=None,
    )  # fmt: skip
    value = orjson.loads(letter.value)
    assert value["original_message"] is None
    assert value["raw_payload_encoding"] == "base64"
    assert base64.b64decode(value["raw_payload"]) == raw
    assert set(value) >= {"original_message", "error", "timestamp", "retry_count"}


@pytest.mark.parametrize("raw", [b"x" * 1_000_000, b"\xff" * 990_000])
def test_dead_letter_of_a_payload_near_the_record_limit_is_truncated_with_hash_and_size(
    raw: bytes,
) -> None:
    letter = dead_letter_record(
        "dlq", raw=raw, error="bad", error_class="permanent", retry_count=0,
        origin=Origin("moderation", 0, 1), task_id=None, item_id=None,
    )  # fmt: skip
    assert len(letter.value) < 1_000_000  # fits Kafka's default record limit
    value = orjson.loads(letter.value)
    assert value["raw_payload_truncated"] is True
    assert value["raw_payload_size"] == len(raw)
    assert value["raw_payload_sha256"] == hashlib.sha256(raw).hexdigest()
    kept = value["raw_payload"]
    kept_bytes = (
        base64.b64decode(kept) if value["raw_payload_encoding"] == "base64" else kept.encode()
    )
    assert raw.startswith(kept_bytes) and kept_bytes


def test_origin_of_reads_kafkasource_ids_and_sources() -> None:
    origin = origin_of(
        {"id": "partition:3/offset:99", "source": "/apis/v1/namespaces/x/kafkasources/k#topic-a"}
    )
    assert origin == Origin("topic-a", 3, 99)


def test_raw_bytes_of_each_data_shape() -> None:
    assert raw_bytes(None) == b""
    assert raw_bytes(b"x") == b"x"
    assert raw_bytes("x") == b"x"
    assert orjson.loads(raw_bytes({"a": 1})) == {"a": 1}


def test_retry_delay_doubles_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.config import get_settings

    monkeypatch.setenv("RETRY_BACKOFF_BASE_SECONDS", "1")
    monkeypatch.setenv("RETRY_BACKOFF_MAX_SECONDS", "3")
    get_settings.cache_clear()
    assert [retry_delay(n) for n in range(4)] == [timedelta(seconds=s) for s in (1, 2, 3, 3)]


def test_adapter_wraps_a_plain_record_like_kafkasource() -> None:
    headers, body = cloudevent_request(FakeRecord(b'{"item_id": 7}'), "/src")
    assert body == b'{"item_id": 7}'
    assert headers["ce-type"] == "dev.knative.kafka.event"
    assert headers["ce-id"] == "partition:2/offset:41"
    assert headers["ce-source"] == "/src#moderation"
    assert headers["ce-key"] == "7"
    assert headers["ce-kafkaoffset"] == "41"


def test_adapter_passes_on_a_records_own_cloudevent_headers() -> None:
    record = FakeRecord(
        b"{}",
        [("ce_specversion", b"1.0"), ("ce_id", b"12"), ("ce_type", b"t"), ("ce_source", b"/s"),
         ("content-type", b"application/json"), ("ce_dueat", b"2030-01-01T00:00:00+00:00")],
    )  # fmt: skip
    headers, _ = cloudevent_request(record, "/src")
    assert headers["ce-id"] == "12"
    assert headers["ce-type"] == "t"
    assert headers["content-type"] == "application/json"
    assert due_time(FakeRecord(b"{}")) is None
    # A due time years away is held to the longest backoff from now (30 s by default).
    due = due_time(record)
    assert due is not None
    assert 0 < (due - datetime.now(UTC)).total_seconds() <= 30
    soon = datetime.now(UTC) + timedelta(seconds=5)
    assert due_time(FakeRecord(b"{}", [("ce_dueat", soon.isoformat().encode())])) == soon


def test_raw_bytes_keeps_what_orjson_refuses() -> None:
    # Found by the property test through the consumer: such a record was a 500, forever.
    assert raw_bytes({"item_id": -(2**63) - 1}) == b'{"item_id": -9223372036854775809}'
    assert raw_bytes("\ud800") == b"\xed\xa0\x80"
