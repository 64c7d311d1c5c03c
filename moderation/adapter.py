"""Kafka -> CloudEvent push adapter with Knative KafkaSource semantics.

For each record, in partition order: POST it as a binary-mode CloudEvent to the sink; commit
its offset only after a 2xx; on anything else deliver the same record again with backoff,
never skipping it. Records of the retry topic wait for their `dueat` time first, in a consumer
of their own, so a waiting retry never stalls fresh work.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from moderation.consuming import ConsumerLoop
from shared.messages import DUE_AT, KAFKASOURCE_EVENT_TYPE

log = logging.getLogger(__name__)


def _header_text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def cloudevent_request(message: Any, source: str) -> tuple[dict[str, str], bytes]:
    """HTTP headers and body for one record: its own ce_ headers if it carries a CloudEvent,
    otherwise wrapped the way KafkaSource wraps a plain record."""
    kafka_headers = {name: _header_text(value) for name, value in (message.headers() or [])}
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    headers: dict[str, str] = {}
    if "ce_specversion" in kafka_headers:
        for name, value in kafka_headers.items():
            if name.startswith("ce_"):
                headers[f"ce-{name[3:]}"] = value
    else:
        _, timestamp_ms = message.timestamp()
        stamp = datetime.fromtimestamp(max(timestamp_ms, 0) / 1000, UTC)
        headers.update(
            {
                "ce-specversion": "1.0",
                "ce-id": f"partition:{partition}/offset:{offset}",
                "ce-source": f"{source}#{topic}",
                "ce-type": KAFKASOURCE_EVENT_TYPE,
                "ce-subject": f"partition:{partition}#{offset}",
                "ce-time": stamp.isoformat(),
            }
        )
        if message.key() is not None:
            headers["ce-key"] = _header_text(message.key())
    # Where the record came from, for dead letters.
    headers["ce-kafkatopic"] = topic
    headers["ce-kafkapartition"] = str(partition)
    headers["ce-kafkaoffset"] = str(offset)
    if "content-type" in kafka_headers:
        headers["content-type"] = kafka_headers["content-type"]
    return headers, message.value() or b""


def due_time(message: Any) -> datetime | None:
    for name, value in message.headers() or []:
        if name == f"ce_{DUE_AT}":
            try:
                return datetime.fromisoformat(_header_text(value))
            except ValueError:
                return None
    return None


@dataclass
class TopicPusher(ConsumerLoop):
    """One consumer (one thread) pushing its partitions' records to the sink."""

    sink_url: str = ""
    honour_due_time: bool = False
    source: str = "/ad-moderation/adapter"
    backoff_initial: float = 0.2
    backoff_max: float = 5.0
    request_timeout: float = 30.0
    delivered: int = 0

    def consume(self, consumer: Any) -> None:
        with httpx.Client(timeout=self.request_timeout) as client:
            while not self._stop.is_set():
                message = consumer.poll(0.2)
                if message is None:
                    continue
                if message.error():
                    log.warning("%s: consumer error: %s", self.topic, message.error())
                    continue
                self._handle(consumer, client, message)

    def _handle(self, consumer: Any, client: httpx.Client, message: Any) -> None:
        headers, body = cloudevent_request(message, self.source)
        due = due_time(message) if self.honour_due_time else None
        tried = due is None or datetime.now(UTC) >= due
        if tried and self._post(client, message, headers, body):
            # The fast path: nothing paused, so what was fetched behind this record stays.
            self._commit(consumer, message)
            return
        # The record must wait (its due time, or a failing sink). Pause every partition this
        # consumer owns and keep polling, so it stays in its group and hands out nothing else
        # meanwhile; then start again exactly where each partition was.
        from confluent_kafka import TopicPartition

        owned = consumer.assignment()
        positions = consumer.position(owned)
        consumer.pause(owned)
        delivered = False
        try:
            while due and datetime.now(UTC) < due and not self._stop.is_set():
                self._idle_poll(consumer, min(0.2, (due - datetime.now(UTC)).total_seconds()))
            delivered = self._deliver_with_backoff(
                consumer, client, message, headers, body, wait_first=tried
            )
            if delivered:
                self._commit(consumer, message)
        finally:
            again = TopicPartition(message.topic(), message.partition(), message.offset())
            next_offset = message.offset() + 1 if delivered else message.offset()
            for position in positions:
                if (position.topic, position.partition) == (again.topic, again.partition):
                    position.offset = next_offset
            self._resume(consumer, owned, positions)

    def _commit(self, consumer: Any, message: Any) -> None:
        consumer.commit(message=message, asynchronous=True)
        self.delivered += 1

    def _idle_poll(self, consumer: Any, seconds: float) -> None:
        """Serve the group protocol while paused; a record that still arrives (a partition
        assigned meanwhile) is put back, never dropped."""
        from confluent_kafka import TopicPartition

        message = consumer.poll(max(seconds, 0))
        if message is not None and not message.error():
            consumer.seek(TopicPartition(message.topic(), message.partition(), message.offset()))

    def _resume(self, consumer: Any, owned: list[Any], positions: list[Any]) -> None:
        from confluent_kafka import KafkaException

        try:
            for position in positions:
                if position.offset >= 0:
                    consumer.seek(position)
            consumer.resume(owned)
        except KafkaException as error:
            # Partitions revoked meanwhile: their new owner starts at the committed offsets.
            log.info("%s: not resumed: %s", self.topic, error)

    def _post(
        self, client: httpx.Client, message: Any, headers: dict[str, str], body: bytes
    ) -> bool:
        try:
            response = client.post(self.sink_url, headers=headers, content=body)
        except httpx.HTTPError as error:
            log.warning("%s: sink unreachable: %s", self.topic, error)
            return False
        if 200 <= response.status_code < 300:
            return True
        log.warning(
            "%s[%d]@%d: sink answered %d",
            message.topic(), message.partition(), message.offset(), response.status_code,
        )  # fmt: skip
        return False

    def _deliver_with_backoff(
        self,
        consumer: Any,
        client: httpx.Client,
        message: Any,
        headers: dict[str, str],
        body: bytes,
        wait_first: bool,
    ) -> bool:
        """POST until a 2xx (True) or until stopped (False); never skips the record."""
        backoff = self.backoff_initial
        while not self._stop.is_set():
            if wait_first:
                deadline = time.monotonic() + backoff
                while time.monotonic() < deadline and not self._stop.is_set():
                    self._idle_poll(consumer, 0.1)
                backoff = min(backoff * 2, self.backoff_max)
            wait_first = True
            if not self._stop.is_set() and self._post(client, message, headers, body):
                return True
        return False


class Adapter:
    """The moderation topic and the retry topic, each consumed by `concurrency` pushers in one
    consumer group: each pusher owns some partitions, so order within a partition holds while
    partitions are pushed in parallel (KafkaSource's "ordered" delivery)."""

    def __init__(
        self,
        bootstrap_servers: str,
        sink_url: str,
        topic: str,
        retry_topic: str,
        group_id: str = "moderation-consumer",
        concurrency: int = 4,
    ) -> None:
        retry_group = f"{group_id}-retry"
        self.pushers = [
            TopicPusher(bootstrap_servers, topic, group_id, sink_url=sink_url)
            for _ in range(concurrency)
        ] + [
            TopicPusher(bootstrap_servers, retry_topic, retry_group, sink_url=sink_url,
                        honour_due_time=True)
            for _ in range(concurrency)
        ]  # fmt: skip
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for number, pusher in enumerate(self.pushers):
            thread = threading.Thread(
                target=pusher.run, name=f"push-{pusher.topic}-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        for pusher in self.pushers:
            pusher.stop()
        for thread in self._threads:
            thread.join(timeout)
