"""What this package's long-running Kafka consumers share: a subscribed consumer configured for
the project, and a loop that starts over after a crash until it is stopped."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

from shared.kafka_admin import consumer_config

log = logging.getLogger(__name__)


@dataclass
class ConsumerLoop:
    # Consumer settings a subclass needs on top of the project's consumer_config.
    extra_config: ClassVar[dict[str, Any]] = {}

    bootstrap_servers: str
    topic: str
    group_id: str
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Consume until stop(); a crash of the loop is logged and the loop starts over."""
        while not self._stop.is_set():
            try:
                consumer = self.subscribe()
                try:
                    self.consume(consumer)
                finally:
                    consumer.close()
            except Exception:
                log.exception("%s (%s): failed, starting over", type(self).__name__, self.topic)
                self._stop.wait(1.0)

    def subscribe(self) -> Any:
        from confluent_kafka import Consumer

        consumer = Consumer(
            consumer_config(self.bootstrap_servers, self.group_id, **self.extra_config)
        )
        consumer.subscribe([self.topic], on_assign=self.on_assign, on_revoke=self.on_revoke)
        return consumer

    def on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        """Partitions handed to this consumer (called from within poll); they start at their
        committed offsets unless this assigns them otherwise."""

    def on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        """Partitions handed to another member of the group (called from within poll)."""

    def consume(self, consumer: Any) -> None:
        """Poll and handle records until self._stop is set; commit only what was handled."""
        raise NotImplementedError
