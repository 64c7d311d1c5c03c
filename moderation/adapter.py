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

from shared.kafka_admin import consumer_config
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
class TopicPusher:
    """One consumer (one thread) pushing one topic's records to the sink."""

    bootstrap_servers: str
    topic: str
    sink_url: str
    group_id: str
    honour_due_time: bool = False
    source: str = "/ad-moderation/adapter"
    backoff_initial: float = 0.2
    backoff_max: float = 5.0
    request_timeout: float = 30.0

    def __post_init__(self) -> None:
        self.delivered = 0
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Consume until stop(); a crash of the loop is logged and the loop starts over."""
        while not self._stop.is_set():
            try:
                self._run()
            except Exception:
                log.exception("%s: pusher failed, starting over", self.topic)
                self._stop.wait(1.0)

    def _run(self) -> None:
        from confluent_kafka import Consumer

        consumer = Consumer(consumer_config(self.bootstrap_servers, self.group_id))
        consumer.subscribe([self.topic])
        try:
            with httpx.Client(timeout=self.request_timeout) as client:
                while not self._stop.is_set():
                    message = consumer.poll(0.2)
                    if message is None:
                        continue
                    if message.error():
                        log.warning("%s: consumer error: %s", self.topic, message.error())
                        continue
                    self._handle(consumer, client, message)
        finally:
            consumer.close()

    def _handle(self, consumer: Any, client: httpx.Client, message: Any) -> None:
        from confluent_kafka import TopicPartition

        partition = TopicPartition(message.topic(), message.partition())
        # While this record waits (due time, or a failing sink), its partition is paused and
        # the consumer keeps polling, so it stays in its group and nothing behind it is read.
        consumer.pause([partition])
        try:
            if self.honour_due_time:
                due = due_time(message)
                while due and datetime.now(UTC) < due and not self._stop.is_set():
                    consumer.poll(min(0.2, (due - datetime.now(UTC)).total_seconds()))
            if not self._deliver(consumer, client, message):
                return  # stopping: not committed, so it is delivered again after a restart
            consumer.commit(message=message, asynchronous=True)
            self.delivered += 1
        finally:
            self._resume(consumer, message)

    def _resume(self, consumer: Any, message: Any) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        # Continue right after this record (or at it, if it was not delivered): pausing
        # dropped what had been fetched behind it.
        done = not self._stop.is_set()
        next_offset = message.offset() + (1 if done else 0)
        partition = TopicPartition(message.topic(), message.partition(), next_offset)
        try:
            consumer.seek(partition)
            consumer.resume([partition])
        except KafkaException as error:
            # The partition was revoked meanwhile: its new owner starts at the committed offset.
            log.info("%s[%d]: not resumed: %s", self.topic, message.partition(), error)

    def _deliver(self, consumer: Any, client: httpx.Client, message: Any) -> bool:
        headers, body = cloudevent_request(message, self.source)
        backoff = self.backoff_initial
        while not self._stop.is_set():
            try:
                response = client.post(self.sink_url, headers=headers, content=body)
                if 200 <= response.status_code < 300:
                    return True
                log.warning(
                    "%s[%d]@%d: sink answered %d, delivering again in %.1f s",
                    message.topic(), message.partition(), message.offset(),
                    response.status_code, backoff,
                )  # fmt: skip
            except httpx.HTTPError as error:
                log.warning("%s: sink unreachable (%s), again in %.1fs", self.topic, error, backoff)
            deadline = time.monotonic() + backoff
            while time.monotonic() < deadline and not self._stop.is_set():
                consumer.poll(0.1)
            backoff = min(backoff * 2, self.backoff_max)
        return False


class Adapter:
    """The moderation topic and the retry topic, each consumed by its own pusher thread."""

    def __init__(
        self,
        bootstrap_servers: str,
        sink_url: str,
        topic: str,
        retry_topic: str,
        group_id: str = "moderation-consumer",
    ) -> None:
        self.pushers = [
            TopicPusher(bootstrap_servers, topic, sink_url, group_id),
            TopicPusher(
                bootstrap_servers, retry_topic, sink_url, f"{group_id}-retry", honour_due_time=True
            ),
        ]
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for pusher in self.pushers:
            thread = threading.Thread(target=pusher.run, name=f"push-{pusher.topic}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        for pusher in self.pushers:
            pusher.stop()
        for thread in self._threads:
            thread.join(timeout)
