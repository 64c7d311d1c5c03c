"""Publishing to Kafka: one idempotent producer per process, created lazily, replaced when broken.

`publish()` awaits the broker's acknowledgement of each record (or a timeout) without blocking
the event loop: a poller thread serves librdkafka's delivery callbacks and resolves futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
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


def _resolve(future: asyncio.Future[bool], delivered: bool) -> None:
    if not future.done():
        future.set_result(delivered)


class Publisher:
    """An idempotent confluent-kafka producer that reports, per record, whether it was delivered."""

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self._producer: Any = None
        self._broken = False  # set by a delivery callback; the next publish replaces the producer
        # Set when the producer lost every broker. What it had in flight then keeps it from
        # delivering anything until message.timeout.ms has passed (and a memory-only broker
        # forgets its producer id), so it is replaced, at most once a second, until a new one
        # stays connected: publishing works again within a second of the broker's return.
        self._lost_brokers = False
        self._created_at = 0.0
        self._generation = 0  # of the current producer: a dropped one's errors are ignored
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None
        self._lock = threading.Lock()

    def _get_producer(self) -> Any:
        with self._lock:
            lost = self._lost_brokers and time.monotonic() - self._created_at >= 1.0
            if (self._broken or lost) and self._producer is not None:
                # Outstanding records of a broken producer are lost to it; their outbox rows
                # stay unpublished and the relay sends them again.
                self._drop(self._producer)
                self._producer = None
            if self._producer is None:
                from confluent_kafka import Producer

                self._broken = self._lost_brokers = False
                self._created_at = time.monotonic()
                self._generation += 1
                self._producer = Producer(
                    producer_config(
                        self.bootstrap_servers, error_cb=self._error_callback(self._generation)
                    )
                )
            if self._poller is None:
                self._poller = threading.Thread(
                    target=self._poll_forever, name="kafka-delivery", daemon=True
                )
                self._poller.start()
            return self._producer

    def _error_callback(self, generation: int) -> Any:
        def on_error(error: Any) -> None:
            from confluent_kafka import KafkaError

            if generation != self._generation:
                return  # a producer already dropped (the poller may still be polling it)
            if error.code() == KafkaError._ALL_BROKERS_DOWN:
                self._lost_brokers = True
            if error.fatal():
                self._broken = True

        return on_error

    def _poll_forever(self) -> None:
        while not self._closed.is_set():
            producer = self._producer
            if producer is None:
                self._closed.wait(0.05)
                continue
            try:
                producer.poll(0.05)  # runs delivery callbacks on this thread
            except Exception as error:  # a fatal producer error surfaces here (or as SystemError)
                log.warning("kafka producer failed: %r; it will be replaced", error)
                self._broken = True
                self._closed.wait(1.0)  # until the next publish replaces it

    @staticmethod
    def _drop(producer: Any) -> None:
        try:
            producer.purge()
            producer.flush(0)
        except Exception as error:  # it is being thrown away anyway
            log.warning("dropping a kafka producer: %r", error)

    async def publish(self, records: Sequence[Record], wait_seconds: float) -> list[bool]:
        """Produce every record; True where the broker acknowledged it within wait_seconds.

        A record not acknowledged in time stays queued; if it is delivered later, the relay may
        send it once more, which the consumer's status guard makes harmless.
        """
        if not records:
            return []
        from confluent_kafka import KafkaException

        loop = asyncio.get_running_loop()
        producer = self._get_producer()
        futures: list[asyncio.Future[bool]] = []
        for record in records:
            future: asyncio.Future[bool] = loop.create_future()
            futures.append(future)
            try:
                producer.produce(
                    record.topic,
                    key=record.key.encode(),
                    value=record.value,
                    headers=list(record.headers.items()),
                    on_delivery=self._callback(loop, future),
                )
            except (KafkaException, BufferError) as error:
                log.warning("kafka produce failed: %s", error)
                self._broken = self._broken or _is_fatal(error)
                future.set_result(False)
        await asyncio.wait(futures, timeout=wait_seconds)
        return [future.done() and future.result() for future in futures]

    def _callback(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[bool]) -> Any:
        def on_delivery(error: Any, message: Any) -> None:
            if error is not None:
                log.warning("kafka delivery failed: %s", error)
                if error.fatal() or error.name() in _REPLACE_PRODUCER_ON:
                    self._broken = True
            else:  # it reaches a broker again by itself: keep it
                self._lost_brokers = False
            # RuntimeError: the requesting event loop is gone, so nobody waits any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, future, error is None)

        return on_delivery

    async def publish_or_raise(self, records: Sequence[Record], wait_seconds: float) -> None:
        """For outcomes that must be durable before answering: all records, or BrokerUnavailable."""
        if not all(await self.publish(records, wait_seconds)):
            raise BrokerUnavailable()

    def close(self, wait_seconds: float = 5.0) -> None:
        """Deliver what is queued for up to wait_seconds; drop the rest (the outbox keeps it)."""
        self._closed.set()
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None and producer.flush(wait_seconds):
            self._drop(producer)


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
