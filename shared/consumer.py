"""The moderation consumer's rules: score a queued ad, or retry it, or dead-letter it.

`handle()` returns only once the outcome is durable (task row updated, or the record
acknowledged on the retry / dead-letter topic); anything else raises, and the caller answers
5xx so the record is delivered again. Updates only ever touch pending tasks, so a
duplicate delivery never changes a finished task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from shared import db, logs, metrics, repository
from shared.config import get_settings
from shared.errors import (
    DatabaseUnavailable,
    InvalidMessage,
    ItemNotFound,
    ModelUnavailable,
    ModerationError,
    Outcome,
    ScoringFailed,
    TaskNotFound,
)
from shared.kafka import get_publisher
from shared.messages import (
    REQUEST_ID,
    CloudEvent,
    Message,
    Origin,
    dead_letter_record,
    now,
    origin_of,
    parse_message,
    raw_bytes,
    retry_record,
)
from shared.model import get_model
from shared.schemas import Ad

log = logging.getLogger(__name__)


@dataclass
class Delivery:
    """One delivery of one record, and what is known about it so far."""

    raw: bytes
    origin: Origin
    message: Message | None = None
    task_id: int | None = None


def retry_delay(retry_count: int) -> timedelta:
    """Exponential backoff with a cap: base, 2*base, 4*base, ... at most max."""
    settings = get_settings()
    seconds = settings.retry_backoff_base_seconds * (2**retry_count)
    return timedelta(seconds=min(seconds, settings.retry_backoff_max_seconds))


async def handle(data: Any, attributes: dict[str, Any]) -> str:
    """Process one delivered record; returns what happened (for logs and tests)."""
    _log_context(attributes)
    started = time.perf_counter()
    outcome = await _handle(data, attributes)
    _finished(outcome, time.perf_counter() - started)
    return outcome


def _log_context(attributes: dict[str, Any], message: Message | None = None) -> None:
    request_id = attributes.get(REQUEST_ID)
    logs.request_id.set(str(request_id) if request_id else None)
    logs.task_id.set(message.task_id if message else None)
    logs.item_id.set(message.item_id if message else None)


def _finished(outcome: str, seconds: float) -> None:
    metrics.TASK_PROCESSING.observe(seconds)
    metrics.TASKS.labels(outcome).inc()
    log.info("task %s: %s", logs.task_id.get(), outcome, extra={"fields": {"outcome": outcome}})


@dataclass
class _Queued:
    """An event of a batch on the common path: a task of the project's own format."""

    index: int
    attributes: dict[str, Any]
    delivery: Delivery
    message: Message
    task_id: int


async def handle_batch(events: Sequence[CloudEvent | ModerationError]) -> list[dict[str, Any]]:
    """Process a batch of delivered records; one result per event, in their order: status 200
    with the outcome once it is durable, else the status a single delivery would be answered.

    The common case (a pending task of the project's own records, its ad present) is read,
    scored and written for the whole batch at once; every other event goes through handle(),
    one by one, exactly as if delivered alone."""
    results: list[dict[str, Any] | None] = [None] * len(events)
    queued: list[_Queued] = []
    alone: list[int] = []
    seen: set[int] = set()
    for index, event in enumerate(events):
        if isinstance(event, ModerationError):
            results[index] = _error_result(None, event)
            continue
        data, attributes = event
        try:
            delivery = Delivery(raw=raw_bytes(data), origin=origin_of(attributes))
            message = parse_message(delivery.raw)
        except (InvalidMessage, ValueError, TypeError):  # alone, to be answered as alone
            message = None
        if message is None or message.task_id is None or message.task_id in seen:
            alone.append(index)  # a task twice in one batch: the second sees the first's outcome
            continue
        seen.add(message.task_id)
        delivery.message, delivery.task_id = message, message.task_id
        queued.append(_Queued(index, attributes, delivery, message, message.task_id))

    started = time.perf_counter()
    outcomes = await _score_together(queued)
    elapsed = time.perf_counter() - started
    for item in queued:
        outcome = outcomes.get(item.index)
        if outcome is None:
            alone.append(item.index)
            continue
        _log_context(item.attributes, item.message)
        if isinstance(outcome, str):
            _finished(outcome, elapsed)
            results[item.index] = {"id": item.attributes["id"], "status": 200, "outcome": outcome}
        else:
            results[item.index] = _error_result(item.attributes, outcome)

    for index in sorted(alone):
        data, attributes = cast("CloudEvent", events[index])
        try:
            outcome = await handle(data, attributes)
            results[index] = {"id": attributes["id"], "status": 200, "outcome": outcome}
        except Exception as error:
            results[index] = _error_result(attributes, error)
    return cast("list[dict[str, Any]]", results)


def _error_result(attributes: dict[str, Any] | None, error: Exception) -> dict[str, Any]:
    """What a single delivery would have been answered, as a batch result."""
    event_id = attributes.get("id") if attributes else None
    if isinstance(error, ModerationError):
        return {"id": event_id, "status": error.status, "detail": error.detail_value}
    log.error("event %s: %r", event_id, error)
    return {"id": event_id, "status": 500, "detail": "Internal Server Error"}


async def _score_together(queued: list[_Queued]) -> dict[int, str | Exception]:
    """Outcomes by event index of what was done for the whole batch: completed or duplicate,
    or, when the database or the model is away, what that failure's handling did for each.
    Events left out go alone, and so does the whole batch on any other failure: one bad row
    must not fail or delay the others."""
    if not queued:
        return {}
    try:
        return await _complete_together(queued)
    except (DatabaseUnavailable, ModelUnavailable) as error:
        failure = error
    except Exception:  # scoring or a row failed: each event alone gets its own outcome
        log.warning("a batch of %d could not be moderated together", len(queued), exc_info=True)
        return {}

    # Each event's failure handling, as a single delivery's; run together, so the retry records
    # share the producer's batches.
    async def fail(item: _Queued) -> str:
        _log_context(item.attributes, item.message)  # in a task of its own: its own context
        return await _on_failure(item.delivery, failure)

    handled = await asyncio.gather(*(fail(item) for item in queued), return_exceptions=True)
    return {
        item.index: outcome if isinstance(outcome, str | Exception) else ScoringFailed()
        for item, outcome in zip(queued, handled, strict=True)
    }


async def _complete_together(queued: list[_Queued]) -> dict[int, str | Exception]:
    model = get_model()
    outcomes: dict[int, str | Exception] = {}
    async with db.connection(autocommit=True) as conn:
        found = await repository.get_tasks_and_ads(conn, [item.task_id for item in queued])
        scorable: list[tuple[_Queued, Ad, datetime]] = []
        for item in queued:
            task, ad = found.get(item.task_id, (None, None))
            if task is None or task["item_id"] != item.message.item_id:
                continue  # alone, to fail as a single delivery would
            if task["status"] != "pending":
                outcomes[item.index] = "duplicate"
            elif ad is not None:
                scorable.append((item, ad, task["created_at"]))
        scores = model.score([ad for _, ad, _ in scorable])
        updated = await repository.complete_tasks(
            conn,
            [
                (item.task_id, score.is_violation, score.probability, item.message.retry_count + 1)
                for (item, _, _), score in zip(scorable, scores, strict=True)
            ],
            model_version=model.version,
        )
    finished = now()
    for item, _, created_at in scorable:
        if item.task_id in updated:
            outcomes[item.index] = "completed"
            metrics.TASK_AGE.observe((finished - created_at).total_seconds())
        else:
            outcomes[item.index] = "duplicate"
    return outcomes


async def _handle(data: Any, attributes: dict[str, Any]) -> str:
    delivery = Delivery(raw=raw_bytes(data), origin=origin_of(attributes))
    try:
        delivery.message = parse_message(delivery.raw)
        delivery.task_id = delivery.message.task_id
        logs.task_id.set(delivery.task_id)
        logs.item_id.set(delivery.message.item_id)
        return await _score(delivery)
    except ModerationError as error:
        return await _on_failure(delivery, error)
    except Exception:  # a bug: retried (it may pass next time), never lost
        # The details go to the log only: error_message is shown to API clients.
        log.exception("unexpected error while moderating")
        return await _on_failure(delivery, ScoringFailed(), retryable=True)


async def _score(delivery: Delivery) -> str:
    message = delivery.message
    assert message is not None
    model = get_model()
    # Autocommit: each statement is atomic by itself, and the update below is guarded by the
    # status, so the reads need no transaction (and no BEGIN / COMMIT round trips).
    async with db.connection(autocommit=True) as conn:
        if delivery.task_id is None:
            # A seed producer's record: attach to the item's oldest pending task, or make one.
            # Committed on its own, so that a retry names a task that really exists.
            async with conn.transaction():
                task_id = await repository.oldest_pending_task(conn, message.item_id)
                if task_id is None:
                    task_id = await repository.insert_task(conn, message.item_id)
            delivery.task_id = task_id
            logs.task_id.set(task_id)
        task, ad = await repository.get_task_and_ad(conn, delivery.task_id)
        if task is None:
            raise TaskNotFound(f"Task {delivery.task_id} not found")
        if task["status"] != "pending":
            return "duplicate"
        if task["item_id"] != message.item_id:
            wrong = delivery.task_id
            delivery.task_id = None  # never fail a task on behalf of a record about another item
            raise InvalidMessage(f"task {wrong} is for item {task['item_id']}")
        if ad is None:
            raise ItemNotFound(f"Item {message.item_id} not found")
        score = model.score_one(ad)
        updated = await repository.complete_task(
            conn,
            delivery.task_id,
            is_violation=score.is_violation,
            probability=score.probability,
            model_version=model.version,
            attempts=message.retry_count + 1,
        )
    if not updated:
        return "duplicate"
    metrics.TASK_AGE.observe((now() - task["created_at"]).total_seconds())
    return "completed"


async def _on_failure(delivery: Delivery, error: ModerationError, retryable: bool = False) -> str:
    settings = get_settings()
    publisher = get_publisher()
    message = delivery.message
    retry_count = message.retry_count if message else 0
    retryable = retryable or error.outcome is Outcome.RETRY
    reason = str(error.detail_value)

    if retryable and message is not None and retry_count < settings.max_retries:
        due_at = now() + retry_delay(retry_count)
        record = retry_record(settings.retry_topic, message, delivery.task_id, due_at)
        await publisher.publish_or_raise([record], settings.durable_publish_wait_seconds)
        log.info(
            "task %s: %s; retry %d due at %s", delivery.task_id, reason, retry_count + 1, due_at
        )
        return "retried"

    if retryable:
        reason = f"{reason} (gave up after {retry_count} retries)"
    # The dead letter is the durable outcome: once it is acknowledged, the task will be failed,
    # here or (if the database is down now) by the dead-letter recorder.
    dead_letter = dead_letter_record(
        settings.dlq_topic,
        raw=delivery.raw,
        error=reason,
        error_class=(Outcome.RETRY if retryable else Outcome.DEAD_LETTER).value,
        retry_count=retry_count,
        origin=delivery.origin,
        task_id=delivery.task_id,
        item_id=message.item_id if message else None,
    )
    await publisher.publish_or_raise([dead_letter], settings.durable_publish_wait_seconds)
    log.warning("task %s dead-lettered: %s", delivery.task_id, reason)
    if delivery.task_id is not None and not isinstance(error, TaskNotFound):
        try:
            async with db.connection() as conn:
                await repository.fail_task(
                    conn, delivery.task_id, error_message=reason, attempts=retry_count + 1
                )
        except Exception as failure:  # the dead letter is durable; the recorder fails it later
            log.warning("task %s: left for the dead-letter recorder: %r", delivery.task_id, failure)
    return "dead-lettered"
