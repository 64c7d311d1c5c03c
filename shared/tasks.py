"""Asynchronous moderation: accept a task (task + outbox in one statement), read its result,
and relay outbox rows that were not published right after their commit."""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import weakref
from collections.abc import Coroutine
from typing import Any

import orjson

from shared import db, metrics, repository
from shared.config import get_settings
from shared.errors import (
    BrokerUnavailable,
    DatabaseUnavailable,
    IdempotencyConflict,
    ItemNotFound,
    ModerationError,
    TaskNotFound,
)
from shared.kafka import get_publisher
from shared.messages import SOURCE_ACCEPTED, Record, cloudevent_headers, moderation_payload
from shared.schemas import TaskAccepted, TaskReplay, TaskResult

log = logging.getLogger(__name__)


async def accept(item_id: int, idempotency_key: str | None = None) -> TaskAccepted:
    """The commit is the promise: once it returns, the task reaches completed or failed.

    The task and its outbox row are made by one statement (one round trip, shared with the
    accepts without a key that arrive meanwhile: _Accepts); the record is then
    published in the background, so the answer does not wait for the broker. A record that is
    not delivered is the relay's to publish. A key used before gives that task as it is now (a
    TaskReplay), and nothing new."""
    settings = get_settings()
    for _ in range(2):  # again once if the ad was stored while the first statement ran
        payload = moderation_payload(item_id, None)  # the statement puts the task id in both
        headers = cloudevent_headers("", SOURCE_ACCEPTED)
        if idempotency_key is None:
            made = await _accepts().accept(item_id, payload, headers)
        else:
            async with db.connection(autocommit=True) as conn:
                made = await repository.accept_task(
                    conn, item_id=item_id, idempotency_key=idempotency_key,
                    topic=settings.moderation_topic, key=str(item_id), payload=payload,
                    headers=headers,
                )  # fmt: skip
        if made is not None:
            task_id, outbox_id = made
            payload["task_id"], headers["ce_id"] = task_id, str(task_id)
            record = Record(settings.moderation_topic, str(item_id), orjson.dumps(payload), headers)
            _in_background(_publish_now(outbox_id, record))
            return TaskAccepted(task_id=task_id)
        replay = await _replay(item_id, idempotency_key)
        if replay is not None:
            return replay
    raise ItemNotFound()  # (stored, yet not seen twice: cannot happen; never loop)


_Waiting = tuple[int, dict[str, Any], dict[str, str], "asyncio.Future[tuple[int, int] | None]"]


class _Accepts:
    """Accepts without an idempotency key that arrive while a statement is under way go
    together in the next one: one statement and one commit for all of them. Nothing waits to
    fill a group: at low rates each goes alone, at once. One per event loop (one per worker).

    A request waits at most DATABASE_TIMEOUT in all, as it waits for a pooled connection, then
    answers 503; so do requests beyond MAX_WAITING. A request that gave up is not written (if
    its group's statement had already begun, its task is committed with its outbox row, and
    completes: a 503 promises nothing)."""

    MAX_GROUP = 100
    MAX_WAITING = 10 * MAX_GROUP

    def __init__(self) -> None:
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._writer: asyncio.Task[None] | None = None

    async def accept(
        self, item_id: int, payload: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, int] | None:
        if len(self._waiting) >= self.MAX_WAITING:
            raise DatabaseUnavailable()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, int] | None] = loop.create_future()
        self._waiting.append((item_id, payload, headers, future))
        if self._writer is None or self._writer.done():
            # In a context of its own: its logs are no request's.
            self._writer = loop.create_task(self._write(), context=contextvars.Context())
        try:
            return await asyncio.wait_for(future, get_settings().database_timeout)
        except TimeoutError:
            log.warning("database is not available: no accept statement within the timeout")
            raise DatabaseUnavailable() from None

    async def _write(self) -> None:
        group: list[_Waiting] = []
        try:
            while self._waiting:
                group = []
                while self._waiting and len(group) < self.MAX_GROUP:
                    entry = self._waiting.popleft()
                    if not entry[3].done():  # gave up meanwhile: not written
                        group.append(entry)
                if group:
                    await self._write_group(group)
        finally:  # cancelled (the loop is closing): nobody is left waiting for ever
            for *_, future in [*group, *self._waiting]:
                if not future.done():
                    future.set_exception(DatabaseUnavailable())
            self._waiting.clear()

    async def _write_group(self, group: list[_Waiting]) -> None:
        try:
            async with db.connection(autocommit=True) as conn:
                made = await repository.accept_tasks(
                    conn,
                    topic=get_settings().moderation_topic,
                    requests=[(item, payload, headers) for item, payload, headers, _ in group],
                )
        except Exception as error:  # each request answers it as its own
            if not isinstance(error, ModerationError):
                log.exception("accepting %d tasks failed", len(group))
            for *_, future in group:
                if not future.done():
                    future.set_exception(_each_its_own(error))
            return
        for index, (*_, future) in enumerate(group):
            if not future.done():
                future.set_result(made.get(index))


def _each_its_own(error: Exception) -> ModerationError:
    """An exception object for one waiting request (never one shared by a whole group)."""
    if isinstance(error, ModerationError):
        return type(error)(error.detail_value)
    return ModerationError()


_accepts_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Accepts] = (
    weakref.WeakKeyDictionary()
)


def _accepts() -> _Accepts:
    loop = asyncio.get_running_loop()
    accepts = _accepts_by_loop.get(loop)
    if accepts is None:
        accepts = _accepts_by_loop[loop] = _Accepts()
    return accepts


async def _replay(item_id: int, idempotency_key: str | None) -> TaskReplay | None:
    """Why the accept made nothing: the key names an earlier task (that task as it is now, or
    422 if it was for another ad), there is no such ad (404), or the ad was stored since the
    statement ran (None: accept it now)."""
    async with db.connection() as conn:
        task = await repository.get_task_by_key(conn, idempotency_key) if idempotency_key else None
        if task is None:
            if not await repository.ad_exists(conn, item_id):
                raise ItemNotFound()
            return None
    if task["item_id"] != item_id:
        raise IdempotencyConflict()
    return TaskReplay(
        task_id=task["task_id"],
        status=task["status"],
        is_violation=task["is_violation"],
        probability=task["probability"],
        error_message=task["error_message"],
    )


# Background work of the accept path, referenced until it ends (the loop keeps weak ones).
_running: set[asyncio.Task[None]] = set()


def _in_background(work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(work)
    _running.add(task)
    task.add_done_callback(_running.discard)


async def _publish_now(outbox_id: int, record: Record) -> None:
    """Best effort right after commit; anything that goes wrong is left to the relay."""
    settings = get_settings()
    try:
        (delivered,) = await get_publisher().publish([record], settings.publish_wait_seconds)
    except Exception as error:  # the task is committed; the relay will publish it
        log.warning("outbox row %s left for the relay: %s", outbox_id, error)
        return
    if delivered:
        _published.add(outbox_id)


class _PublishedMarks:
    """Outbox rows delivered right after their commit, marked published together: one UPDATE
    for all that were delivered in the last 20 ms, not a transaction per task. A mark that is
    lost (the database is down, the process stops) costs one more publish by the relay, which
    the consumer ignores."""

    LINGER_SECONDS = 0.02

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._writer: asyncio.Task[None] | None = None

    def add(self, outbox_id: int) -> None:
        self._ids.append(outbox_id)
        loop = asyncio.get_running_loop()
        if self._writer is None or self._writer.done() or self._writer.get_loop() is not loop:
            self._writer = loop.create_task(self._write())

    async def _write(self) -> None:
        await asyncio.sleep(self.LINGER_SECONDS)
        while self._ids:
            ids, self._ids = self._ids, []
            if not db.is_open():  # closed on shutdown meanwhile: not opened again for this
                log.info("%d outbox rows left for the relay to mark", len(ids))
                return
            try:
                async with db.connection(autocommit=True) as conn:
                    await repository.mark_published(conn, ids)
            except Exception as error:  # the relay publishes these rows once more
                log.warning("%d outbox rows not marked published: %s", len(ids), error)


_published = _PublishedMarks()


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
