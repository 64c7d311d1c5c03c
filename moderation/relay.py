"""The outbox relay loop: publishes what async_predict could not publish right after commit.

Several relays may run at once (rows are locked with SKIP LOCKED). It also (re)creates the
project's topics now and then, because a memory-only broker forgets them when it restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from moderation import heartbeat
from shared import db, tasks
from shared.config import get_settings
from shared.errors import ModerationError
from shared.kafka_admin import KafkaSetupError, ensure_topics

log = logging.getLogger(__name__)

TOPICS_CHECK_INTERVAL = 5.0
# Short, so a stop asked for while the broker is down is not held up by the check.
TOPICS_CHECK_TIMEOUT = 3.0
STALE_CHECK_INTERVAL = 10.0
PRUNE_INTERVAL = 600.0
MEASURE_INTERVAL = 5.0


def project_topics() -> dict[str, int]:
    settings = get_settings()
    partitions = settings.topic_partitions
    return {
        settings.moderation_topic: partitions,
        settings.retry_topic: partitions,
        settings.dlq_topic: partitions,
    }


def ensure_project_topics(timeout: float = 10.0) -> list[str]:
    bootstrap = get_settings().kafka_bootstrap_servers
    if bootstrap is None:
        raise KafkaSetupError("KAFKA_BOOTSTRAP_SERVERS is not set")
    return list(ensure_topics(bootstrap, project_topics(), timeout=timeout))


async def one_pass() -> dict[str, int]:
    """One pass of each duty, as a scheduled job runs it: tasks requeued, rows published and
    rows pruned."""
    requeued = await tasks.requeue_stale()
    published = await tasks.relay_once()
    return {"published": published, "requeued": requeued, "pruned": await tasks.prune_outbox()}


async def run(interval: float = 1.0, once: bool = False, stop: asyncio.Event | None = None) -> int:
    """Relay until `stop` is set (or one pass with once=True); returns rows published.

    A stop lets the pass under way finish: a batch that was sent is marked published, so
    nothing is published twice because the relay was stopped."""
    stop = stop or asyncio.Event()
    total = 0
    topics_checked = stale_checked = pruned_at = measured_at = 0.0
    try:
        while not stop.is_set():
            heartbeat.beat()
            if time.monotonic() - measured_at > MEASURE_INTERVAL:
                try:
                    await tasks.measure_outbox()
                    measured_at = time.monotonic()
                except Exception as error:
                    log.warning("relay: outbox backlog not measured: %r", error)
            if time.monotonic() - pruned_at > PRUNE_INTERVAL:
                try:
                    if pruned := await tasks.prune_outbox():
                        log.info("relay: pruned %d published outbox rows", pruned)
                    pruned_at = time.monotonic()
                except Exception as error:
                    log.warning("relay: outbox not pruned: %r", error)
            if time.monotonic() - stale_checked > STALE_CHECK_INTERVAL:
                try:
                    await tasks.requeue_stale()
                    stale_checked = time.monotonic()
                except Exception as error:
                    log.warning("relay: stale tasks not checked: %r", error)
            if time.monotonic() - topics_checked > TOPICS_CHECK_INTERVAL:
                try:
                    created = await asyncio.to_thread(ensure_project_topics, TOPICS_CHECK_TIMEOUT)
                    if created:
                        log.info("relay: created topics %s", ", ".join(created))
                    topics_checked = time.monotonic()
                except Exception as error:  # broker down or refusing: try again later
                    log.warning("relay: topics not checked: %r", error)
            if stop.is_set():  # asked during the checks: no publish (up to its wait) begun
                break
            try:
                published = await tasks.relay_once()
                total += published
                if published:
                    log.info("relay: published %d outbox rows", published)
                    continue  # more may be waiting
            except ModerationError as error:
                log.warning("relay: %s", error)
            except Exception:  # keep relaying; the next pass starts afresh
                log.exception("relay: pass failed")
            if once:
                return total
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        log.info("relay: stopped, %d rows published", total)
        return total
    finally:
        await db.close()
