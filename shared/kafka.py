"""Publishing to Kafka: one idempotent producer per process, created lazily, replaced when broken.

`publish()` waits for the broker's acknowledgement of every record (or a timeout) in a worker
thread, so an aio function's event loop never blocks on librdkafka.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

from shared.config import get_settings
from shared.errors import BrokerUnavailable
from shared.kafka_admin import producer_config
from shared.messages import Record

log = logging.getLogger(__name__)

# After these, librdkafka's idempotent producer cannot go on (e.g. a memory-only broker that
# restarted and forgot the producer id): drop it and make a new one.
_REPLACE_PRODUCER_ON = {
    "_FATAL",
    "_MSG_TIMED_OUT",
    "UNKNOWN_PRODUCER_ID",
    "OUT_OF_ORDER_SEQUENCE_NUMBER",
}


class Publisher:
    """An idempotent confluent-kafka producer that reports, per record, whether it was delivered."""

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self._producer: Any = None
        self._broken = False  # set by a delivery callback; the next publish replaces the producer
        self._lock = threading.Lock()

    def _get_producer(self) -> Any:
        with self._lock:
            if self._broken and self._producer is not None:
                # Outstanding records of a broken producer are lost to it; their outbox rows
                # stay unpublished and the relay sends them again.
                self._producer.purge()
                self._producer.flush(0)
                self._producer = None
            self._broken = False
            if self._producer is None:
                from confluent_kafka import Producer

                self._producer = Producer(producer_config(self.bootstrap_servers))
            return self._producer

    def publish_sync(self, records: Sequence[Record], wait_seconds: float) -> list[bool]:
        """Produce every record, wait up to `wait_seconds`; True where the broker acknowledged."""
        if not records:
            return []
        producer = self._get_producer()
        delivered = [False] * len(records)

        def on_delivery(index: int) -> Any:
            def callback(error: Any, message: Any) -> None:
                if error is None:
                    delivered[index] = True
                    return
                log.warning("kafka delivery failed: %s", error)
                if error.fatal() or error.name() in _REPLACE_PRODUCER_ON:
                    self._broken = True

            return callback

        from confluent_kafka import KafkaException

        for index, record in enumerate(records):
            try:
                producer.produce(
                    record.topic,
                    key=record.key.encode(),
                    value=record.value,
                    headers=list(record.headers.items()),
                    on_delivery=on_delivery(index),
                )
            except (KafkaException, BufferError) as error:
                log.warning("kafka produce failed: %s", error)
                self._broken = self._broken or _is_fatal(error)
                break
            producer.poll(0)
        # Records not acknowledged in time stay queued; if they are delivered later, the relay
        # may send them once more, which the consumer's status guard makes harmless.
        producer.flush(wait_seconds)
        return delivered

    async def publish(self, records: Sequence[Record], wait_seconds: float) -> list[bool]:
        return await asyncio.to_thread(self.publish_sync, records, wait_seconds)

    async def publish_or_raise(self, records: Sequence[Record], wait_seconds: float) -> None:
        """For outcomes that must be durable before answering: all records, or BrokerUnavailable."""
        if not all(await self.publish(records, wait_seconds)):
            raise BrokerUnavailable()

    def close(self, wait_seconds: float = 5.0) -> None:
        """Deliver what is queued for up to wait_seconds; drop the rest (the outbox keeps it)."""
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            if producer.flush(wait_seconds):
                producer.purge()
                producer.flush(0)


def _is_fatal(error: Exception) -> bool:
    args = getattr(error, "args", ())
    kafka_error = args[0] if args else None
    return bool(getattr(kafka_error, "fatal", lambda: False)())


_publisher: Publisher | None = None
_publisher_lock = threading.Lock()


def get_publisher() -> Publisher:
    """The process's publisher; BrokerUnavailable if no broker is configured."""
    global _publisher
    bootstrap = get_settings().kafka_bootstrap_servers
    if bootstrap is None:
        log.error("message broker is not available: KAFKA_BOOTSTRAP_SERVERS is not set")
        raise BrokerUnavailable()
    with _publisher_lock:
        if _publisher is None or _publisher.bootstrap_servers != bootstrap:
            if _publisher is not None:
                _publisher.close(wait_seconds=0)
            _publisher = Publisher(bootstrap)
        return _publisher


def reset() -> None:
    global _publisher
    with _publisher_lock:
        publisher, _publisher = _publisher, None
    if publisher is not None:
        publisher.close(wait_seconds=0)
