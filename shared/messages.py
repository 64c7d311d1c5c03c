"""The Kafka contract: moderation records (seed format + CloudEvents headers) and DLQ records."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared import logs
from shared.errors import InvalidMessage
from shared.schemas import BIGINT_MAX, PositiveId

EVENT_TYPE = "ad.moderation.requested"
SOURCE_ACCEPTED = "/ad-moderation/async_predict"
SOURCE_RETRY = "/ad-moderation/moderation_consumer/retry"
KAFKASOURCE_EVENT_TYPE = "dev.knative.kafka.event"
DUE_AT = "dueat"  # CloudEvents extension on retry records: when the retry may run
REQUEST_ID = "requestid"  # CloudEvents extension: the request id of the accepting request
# The payload a dead letter keeps whole: with base64 (4/3) and the letter's other fields it
# stays well under Kafka's default record limit of 1 MB (message.max.bytes).
DEAD_LETTER_PAYLOAD_BYTES = 512 * 1024


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Record:
    """A Kafka record ready to produce."""

    topic: str
    key: str
    value: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_outbox(cls, row: dict[str, Any]) -> Record:
        return cls(row["topic"], row["key"], orjson.dumps(row["payload"]), dict(row["headers"]))


def moderation_payload(item_id: int, task_id: int | None, retry_count: int = 0) -> dict[str, Any]:
    """The seed format, so the original consumers can read what this service produces."""
    return {
        "item_id": item_id,
        "task_id": task_id,
        "timestamp": now().isoformat(),
        "retry_count": retry_count,
    }


def cloudevent_headers(
    task_id: int | str, source: str, extensions: dict[str, str] | None = None
) -> dict[str, str]:
    """CloudEvents binary-mode Kafka headers (ce_ prefix), as KafkaSource passes them on."""
    headers = {
        "ce_specversion": "1.0",
        "ce_id": str(task_id),
        "ce_source": source,
        "ce_type": EVENT_TYPE,
        "ce_time": now().isoformat(),
        "content-type": "application/json",
    }
    # The request that asked for it, so one task can be followed from accept to result.
    if (request_id := logs.request_id.get()) is not None:
        headers[f"ce_{REQUEST_ID}"] = request_id
    for name, value in (extensions or {}).items():
        headers[f"ce_{name}"] = value
    return headers


def retry_record(topic: str, message: Message, task_id: int | None, due_at: datetime) -> Record:
    """The same request once more, retry_count + 1, not to be run before due_at.

    task_id is None only when the task could not be resolved yet (a seed-format record
    during a database outage): the retry stays in seed format and is resolved then.
    """
    payload = moderation_payload(message.item_id, task_id, message.retry_count + 1)
    if task_id is None:
        del payload["task_id"]
    event_id = str(task_id) if task_id is not None else f"item-{message.item_id}"
    headers = cloudevent_headers(event_id, SOURCE_RETRY, {DUE_AT: due_at.isoformat()})
    headers["ce_id"] = f"{event_id}-retry-{message.retry_count + 1}"
    return Record(topic, str(message.item_id), orjson.dumps(payload), headers)


class Message(BaseModel):
    """A moderation request as it arrives; task_id is absent in seed producers' records."""

    model_config = ConfigDict(extra="ignore")

    item_id: PositiveId
    task_id: Annotated[int, Field(ge=1, le=BIGINT_MAX)] | None = None
    retry_count: Annotated[int, Field(ge=0, le=1000)] = 0
    timestamp: Any = None


# A delivered CloudEvent: its data and its attributes.
CloudEvent = tuple[Any, dict[str, Any]]
# CloudEvents' batched content mode: a JSON array of structured-mode events.
CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"


@dataclass(frozen=True)
class Origin:
    """Where a record came from, for the dead letter."""

    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


_KAFKASOURCE_ID = re.compile(r"partition:(\d+)/offset:(\d+)")


def origin_of(attributes: dict[str, Any]) -> Origin:
    """KafkaSource ids look like `partition:P/offset:O`, sources end in `#topic`;
    the project's own adapter also sets kafkatopic/kafkapartition/kafkaoffset."""
    topic = attributes.get("kafkatopic")
    partition = attributes.get("kafkapartition")
    offset = attributes.get("kafkaoffset")
    found = _KAFKASOURCE_ID.fullmatch(str(attributes.get("id", "")))
    if found and partition is None:
        partition, offset = found.groups()
    source = str(attributes.get("source", ""))
    if topic is None and "#" in source:
        topic = source.rsplit("#", 1)[1]
    return Origin(
        topic=topic,
        partition=int(partition) if partition is not None else None,
        offset=int(offset) if offset is not None else None,
    )


def raw_bytes(data: Any) -> bytes:
    """The payload as bytes, whatever the CloudEvents SDK made of it."""
    if data is None:
        return b""
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if isinstance(data, str):
        return data.encode(errors="surrogatepass")
    try:
        return orjson.dumps(data)
    except TypeError:  # what orjson refuses (an int over 64 bits): the stdlib writes it
        return json.dumps(data).encode()


def parse_message(raw: bytes) -> Message:
    try:
        return Message.model_validate_json(raw)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "message"
        raise InvalidMessage(f"invalid message: {where}: {first['msg']}") from None


def dead_letter_record(
    topic: str,
    *,
    raw: bytes,
    error: str,
    error_class: str,
    retry_count: int,
    origin: Origin,
    task_id: int | None,
    item_id: int | None,
) -> Record:
    """Seed DLQ format plus origin and the raw payload, so nothing unparsable is ever lost.

    A payload too large to fit a dead letter under the broker's record size limit (a record
    near the limit grows when it is base64-encoded and parsed beside itself) is kept as its
    first bytes, its size and its SHA-256, so that the letter is never refused, and the
    partition behind it never stalls.
    """
    truncated = len(raw) > DEAD_LETTER_PAYLOAD_BYTES
    try:
        original: Any = None if truncated else orjson.loads(raw)
    except orjson.JSONDecodeError:
        original = None
    kept = raw[:DEAD_LETTER_PAYLOAD_BYTES]
    try:
        text, encoding = kept.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(kept).decode("ascii"), "base64"
    value = {
        "original_message": original,
        "error": error,
        "error_class": error_class,
        "timestamp": now().isoformat(),
        "retry_count": retry_count,
        "task_id": task_id,
        "item_id": item_id,
        "origin_topic": origin.topic,
        "origin_partition": origin.partition,
        "origin_offset": origin.offset,
        "raw_payload": text,
        "raw_payload_encoding": encoding,
        "request_id": logs.request_id.get(),
    }
    if truncated:
        value |= {
            "raw_payload_truncated": True,
            "raw_payload_size": len(raw),
            "raw_payload_sha256": hashlib.sha256(raw).hexdigest(),
        }
    key = str(item_id) if item_id is not None else (str(task_id) if task_id else "")
    return Record(topic, key, orjson.dumps(value), {"content-type": "application/json"})
