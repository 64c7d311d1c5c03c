"""Asynchronous moderation: accept a task (task + outbox in one transaction), read its result,
and relay outbox rows that were not published right after their commit."""

from __future__ import annotations

import logging

import orjson

from shared import db, metrics, repository
from shared.config import get_settings
from shared.errors import BrokerUnavailable, ItemNotFound, TaskNotFound
from shared.kafka import get_publisher
from shared.messages import SOURCE_ACCEPTED, Record, cloudevent_headers, moderation_payload
from shared.schemas import TaskAccepted, TaskReplay, TaskResult

log = logging.getLogger(__name__)


async def accept(item_id: int, idempotency_key: str | None = None) -> TaskAccepted:
    """The commit is the promise: once it returns, the task reaches completed or failed.

    A key used before gives that task as it is now (a TaskReplay), and nothing new."""
    settings = get_settings()
    async with db.connection() as conn, conn.transaction():
        if not await repository.ad_exists(conn, item_id):
            raise ItemNotFound()
        task_id, created = await repository.insert_task(conn, item_id, idempotency_key)
        if not created:
            task = await repository.get_task(conn, task_id)
            assert task is not None, "the task of a known key exists"
            return TaskReplay(
                task_id=task_id,
                status=task["status"],
                is_violation=task["is_violation"],
                probability=task["probability"],
                error_message=task["error_message"],
            )
        if created:
            payload = moderation_payload(item_id, task_id)
            headers = cloudevent_headers(task_id, SOURCE_ACCEPTED)
            outbox_id = await repository.insert_outbox(
                conn,
                task_id=task_id,
                topic=settings.moderation_topic,
                key=str(item_id),
                payload=payload,
                headers=headers,
            )
    if created:
        record = Record(settings.moderation_topic, str(item_id), orjson.dumps(payload), headers)
        await _publish_now(outbox_id, record)
    return TaskAccepted(task_id=task_id)


async def _publish_now(outbox_id: int, record: Record) -> None:
    """Best effort right after commit; anything that goes wrong is left to the relay."""
    settings = get_settings()
    try:
        publisher = get_publisher()
        (delivered,) = await publisher.publish([record], settings.publish_wait_seconds)
        if delivered:
            async with db.connection() as conn:
                await repository.mark_published(conn, [outbox_id])
    except Exception as error:  # the task is committed; the relay will publish it
        log.warning("outbox row %s left for the relay: %s", outbox_id, error)


async def result(task_id: int) -> TaskResult:
    async with db.connection() as conn:
        row = await repository.get_task(conn, task_id)
    if row is None:
        raise TaskNotFound()
    return TaskResult.model_validate(row)


async def requeue_stale() -> int:
    """Publish again the record of every task still pending long after it was published.

    A record can be lost after the relay marked it published (a broker that forgets, a topic
    deleted by hand); publishing it once more is harmless because duplicates are ignored.
    """
    stale = get_settings().stale_task_seconds
    async with db.connection() as conn:
        requeued = await repository.requeue_stale_outbox(conn, older_than_seconds=stale)
    if requeued:
        log.warning("requeued %d outbox rows of tasks pending for over %.0f s", requeued, stale)
    return requeued


async def prune_outbox() -> int:
    """Delete what the outbox no longer needs: published rows of finished tasks, past retention."""
    retention = get_settings().outbox_retention_seconds
    async with db.connection() as conn:
        return await repository.prune_outbox(conn, older_than_seconds=retention)


async def measure_outbox() -> tuple[int, float]:
    """Outbox rows waiting and the oldest one's age, also set on the relay's gauges."""
    async with db.connection() as conn:
        rows, age = await repository.outbox_backlog(conn)
    metrics.OUTBOX_BACKLOG.set(rows)
    metrics.OUTBOX_OLDEST.set(age)
    return rows, age


async def relay_once(grace_seconds: float | None = None) -> int:
    """Publish unpublished outbox rows (oldest first); returns how many were published.

    Rows are locked with FOR UPDATE SKIP LOCKED, so several relays can run side by side.
    """
    settings = get_settings()
    grace = settings.relay_grace_seconds if grace_seconds is None else grace_seconds
    publisher = get_publisher()
    async with db.connection() as conn, conn.transaction():
        rows = await repository.lock_unpublished(
            conn, limit=settings.relay_batch_size, older_than_seconds=grace
        )
        if not rows:
            return 0
        delivered = await publisher.publish(
            [Record.from_outbox(row) for row in rows], settings.durable_publish_wait_seconds
        )
        published = [row["id"] for row, ok in zip(rows, delivered, strict=True) if ok]
        await repository.mark_published(conn, published)
    metrics.OUTBOX_PUBLISHED.inc(len(published))
    if len(published) < len(rows):
        log.warning(
            "relay: %d of %d outbox rows not delivered", len(rows) - len(published), len(rows)
        )
        if not published:
            raise BrokerUnavailable()
    return len(published)
