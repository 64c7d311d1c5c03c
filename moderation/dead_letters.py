"""The dead-letter recorder: makes every dead-lettered task `failed`, even if the consumer
could not write that itself (the database was down when it gave up).

The consumer's promise when it gives up is the dead-letter record; this process keeps it:
it commits a record's offset only once the task row says `failed` (or was already finished).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

from moderation import heartbeat
from moderation.consuming import ConsumerLoop
from shared import metrics

log = logging.getLogger(__name__)

_FAIL_TASK = (
    "UPDATE moderation_results SET status = 'failed', error_message = %s, attempts = %s,"
    " processed_at = now() WHERE id = %s AND status = 'pending'"
)


def record_failure(conn: psycopg.Connection[Any], value: bytes) -> bool:
    """Fail the task a dead letter names; True if a pending task changed."""
    try:
        letter = orjson.loads(value)
        task_id = int(letter["task_id"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return False  # a letter without a task (poison message): nothing to fail
    error = str(letter.get("error") or "dead-lettered")
    attempts = int(letter.get("retry_count") or 0) + 1
    cursor = conn.execute(_FAIL_TASK, (error, attempts, task_id))
    return cursor.rowcount == 1


@dataclass
class DeadLetterRecorder(ConsumerLoop):
    """Consumes the dead-letter topic; one committed offset per task marked failed."""

    database_url: str = ""
    recorded: int = 0

    def consume(self, consumer: Any) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self._stop.is_set():
                message = consumer.poll(0.2)
                heartbeat.beat()
                if message is None or message.error():
                    continue
                backoff = 0.2
                while not self._stop.is_set():
                    try:
                        if conn is None or conn.closed:
                            conn = psycopg.connect(
                                self.database_url, autocommit=True, connect_timeout=5
                            )
                        if record_failure(conn, message.value() or b""):
                            self.recorded += 1
                            metrics.DEAD_LETTERS_RECORDED.inc()
                        break
                    except psycopg.OperationalError as error:
                        log.warning("database not available (%s), again in %.1fs", error, backoff)
                        conn = None
                        # No poll meanwhile (it could hand out a record that would then be
                        # skipped); a long outage costs a group rejoin and a redelivery.
                        self._stop.wait(backoff)
                        backoff = min(backoff * 2, 5.0)
                    except psycopg.Error as error:  # refused for good (a value out of range)
                        log.error("dead letter %s skipped: %r", message.offset(), error)
                        break
                else:
                    return  # stopping before the task was failed: not committed
                consumer.commit(message=message, asynchronous=True)
        finally:
            if conn is not None:
                conn.close()
