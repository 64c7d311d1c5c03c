"""Kafka -> CloudEvent push adapter with Knative KafkaSource semantics.

For each record, in partition order: POST it as a binary-mode CloudEvent to the sink; commit
its offset only after a 2xx; on a 5xx (or 404, 408, 409, 425, 429, or no answer) deliver the
same record again with backoff, never skipping it. A record the sink rejects for good (any
other 4xx), or that cannot be made into a request at all, goes to the dead-letter topic raw,
like KafkaSource's deadLetterSink, and is committed once that is acknowledged. Records of the
retry topic wait for their `dueat` time first, in a consumer of their own, so a waiting retry
never stalls fresh work.

Records already fetched behind one another are pushed together, in CloudEvents' batched
content mode, when `batch_size` allows: the sink answers a result per event; each partition is
committed up to its first failed event, and from there its records are delivered again one by
one, by the rules above. A sink that cannot take batches gets every record alone that way.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
import orjson

from moderation import heartbeat
from moderation.consuming import ConsumerLoop
from shared import metrics
from shared.config import get_settings
from shared.errors import Outcome
from shared.kafka_admin import admin_config, consumer_config, producer_config
from shared.messages import (
    CLOUDEVENTS_BATCH,
    DUE_AT,
    KAFKASOURCE_EVENT_TYPE,
    Origin,
    dead_letter_record,
)

log = logging.getLogger(__name__)


LAG_INTERVAL_SECONDS = 10.0
# A pusher owning no partition this long, while the topic has one for every pusher, joins the
# group again.
STUCK_AFTER_SECONDS = 20.0
# The cluster id of the embedded broker (Tansu), the only one whose groups may need a reset.
EMBEDDED_CLUSTER_ID = "tansu_cluster"
# How long records fetched together may be held before those not yet delivered are given back
# to be fetched again after a poll: well within max.poll.interval.ms (45 s), so a slow sink
# never makes the pusher leave its group.
HOLD_SECONDS = 10.0
_LAGS: dict[tuple[str, int], int] = {}
_LAG_LOCK = threading.Lock()

# Answers after which KafkaSource delivers again: the sink is not ready or is overloaded.
RETRYABLE_4XX = {404, 408, 409, 425, 429}


def _header_text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    # HTTP header values carry printable ASCII only: percent-encode the rest, as the
    # CloudEvents HTTP binding asks (a binary or non-Latin key must not break delivery).
    return "".join(c if " " <= c <= "~" and c != "%" else quote(c, safe="") for c in text)


# CloudEvents attribute names: lower-case ASCII letters and digits (the spec advises at most
# 20 characters; a longer one is still accepted).
ATTRIBUTE_NAME = re.compile(r"[a-z0-9]{1,64}")
# What the headers of one push may hold in all: well under the request-header limits of
# HTTP servers and proxies (8 KiB in nginx per line, 16 KiB in uvicorn), so a record with
# huge headers is dead-lettered here instead of failing at the sink on every attempt.
MAX_HEADER_BYTES = 8 * 1024


def cloudevent_request(message: Any, source: str) -> tuple[dict[str, str], bytes]:
    """HTTP headers and body for one record: its own ce_ headers if it carries a CloudEvent,
    otherwise wrapped the way KafkaSource wraps a plain record. Raises ValueError for a record
    that cannot be pushed as a CloudEvent (a bad attribute name, headers too large)."""
    kafka_headers = {name: _header_text(value) for name, value in (message.headers() or [])}
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    headers: dict[str, str] = {}
    if "ce_specversion" in kafka_headers:
        for name, value in kafka_headers.items():
            if name.startswith("ce_"):
                if not ATTRIBUTE_NAME.fullmatch(name[3:]):
                    raise ValueError(f"invalid CloudEvent attribute name {name[3:]!r:.80}")
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
    size = sum(len(name) + len(value) + 4 for name, value in headers.items())
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"its headers take {size} bytes, over {MAX_HEADER_BYTES}")
    return headers, message.value() or b""


def structured_event(headers: dict[str, str], body: bytes) -> dict[str, str]:
    """The structured-mode form of a binary-mode push (cloudevent_request's headers and body),
    for a batch: the same attributes, the record's bytes as they are (data_base64)."""
    event = {name[3:]: value for name, value in headers.items() if name.startswith("ce-")}
    if "content-type" in headers:
        event["datacontenttype"] = headers["content-type"]
    event["data_base64"] = base64.b64encode(body).decode()
    return event


def due_time(message: Any) -> datetime | None:
    """When a retry record may be pushed: its `dueat`, but never later than the longest
    backoff from now (RETRY_BACKOFF_MAX_SECONDS), so a wrong or hostile due time cannot
    hold its partition. None (at once) if it has none, or none that reads as a time."""
    for name, value in message.headers() or []:
        if name == f"ce_{DUE_AT}":
            try:
                due = datetime.fromisoformat(_header_text(value))
                due = due if due.tzinfo else due.replace(tzinfo=UTC)  # naive means UTC
            except (ValueError, OverflowError):
                return None
            latest = datetime.now(UTC) + timedelta(seconds=get_settings().retry_backoff_max_seconds)
            return min(due, latest)
    return None


class StuckGroups:
    """Which pusher of this process mends a stuck consumer group, and how: one at a time, at
    least STUCK_AFTER_SECONDS apart. The embedded broker (Tansu 0.6) can hand a group formed
    while its topic was missing an empty assignment it never recomputes; one member joining
    again mends that. If every member leaves at once, the group keeps a leader that is no
    longer a member, which no later member gets past (measured); only a reset of the group
    at the broker mends that. So: first one pusher joins again, alone; if the group is still
    stuck after that (its offsets unmoved, records waiting), the next try resets it, and so
    on, alternately."""

    # How long offsets kept through a reset are applied to partitions assigned after it.
    KEEP_SECONDS = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._tries: dict[str, int] = {}
        # Committed offsets of a group reset at the broker (which drops them), by partition,
        # for the members of this process to start from; and when they were read.
        self._kept: dict[str, tuple[float, dict[tuple[str, int], int]]] = {}
        self._positions: dict[str, dict[tuple[str, int], int] | None] = {}

    def claim(self, group: str, now: float) -> str | None:
        """How the pusher asking mends `group` now ("rejoin" or "reset"), or None: not it."""
        with self._lock:
            if now - self._last.get(group, -STUCK_AFTER_SECONDS) < STUCK_AFTER_SECONDS:
                return None
            self._last[group] = now
            tries = self._tries[group] = self._tries.get(group, 0) + 1
            return "rejoin" if tries % 2 else "reset"

    def mended(self, group: str) -> None:
        with self._lock:
            self._tries.pop(group, None)

    def note_position(self, group: str, committed: dict[tuple[str, int], int] | None) -> None:
        """The group's committed offsets when it was last tried: a reset must see them
        unchanged (a group whose offsets move is consuming somewhere)."""
        with self._lock:
            self._positions[group] = committed

    def position(self, group: str) -> dict[tuple[str, int], int] | None:
        with self._lock:
            return self._positions.get(group)

    def keep(self, group: str, offsets: dict[tuple[str, int], int], now: float) -> None:
        with self._lock:
            self._kept[group] = (now, offsets)

    def kept(self, group: str, partition: tuple[str, int], now: float) -> int | None:
        """The offset kept through a reset for a partition just assigned, once: after that,
        this process's own commits say where it is."""
        with self._lock:
            since, offsets = self._kept.get(group, (0.0, {}))
            if now - since > self.KEEP_SECONDS:
                self._kept.pop(group, None)
                return None
            return offsets.pop(partition, None)


_stuck_groups = StuckGroups()


def _owned(consumer: Any) -> set[tuple[str, int]]:
    """The (topic, partition) pairs assigned to a consumer now."""
    return {(tp.topic, tp.partition) for tp in consumer.assignment()}


@dataclass
class TopicPusher(ConsumerLoop):
    """One consumer (one thread) pushing its partitions' records to the sink."""

    # A sink may take up to request_timeout to answer while nothing is polled: stay in the
    # group well past that, but hand a hung pusher's partitions on within a minute (librdkafka's
    # default is five).
    extra_config: ClassVar[dict[str, Any]] = {"max.poll.interval.ms": 45_000}

    sink_url: str = ""
    dead_letter_topic: str = "moderation_dlq"
    honour_due_time: bool = False
    source: str = "/ad-moderation/adapter"
    backoff_initial: float = 0.2
    backoff_max: float = 5.0
    request_timeout: float = 20.0
    # A sink that answers 500 for one record this many times in a row fails on the record itself
    # (a 502/503/504 or no answer means the sink is away: those are retried without end).
    # Like KafkaSource's delivery.retry, the record then goes to the dead-letter topic.
    max_server_errors: int = 10
    group_size: int = 1  # pushers of this topic in the group: each should own a partition
    # At most this many records in one push (1: each alone, as a KafkaSource pushes them), and
    # about this many bytes, well under the sink's body limit (MAX_BODY_BYTES, 1 MiB).
    batch_size: int = 1
    batch_bytes: int = 512 * 1024
    delivered: int = 0
    _producer: Any = field(default=None, init=False, repr=False)
    # The next offset to commit of each owned partition: what was delivered or dead-lettered.
    _done: dict[tuple[str, int], int] = field(default_factory=dict, init=False, repr=False)
    _server_errors: int = field(default=0, init=False, repr=False)  # of the record being pushed
    # Partitions whose records go alone up to (not including) an offset: the rest of a batch
    # that did not all succeed, delivered again by the single-record rules.
    _alone_until: dict[tuple[str, int], int] = field(default_factory=dict, init=False, repr=False)

    def consume(self, consumer: Any) -> None:
        lag_measured = assignment_checked = 0.0
        unassigned_since: float | None = None
        self._done.clear()
        self._alone_until.clear()
        with httpx.Client(timeout=self.request_timeout) as client:
            while not self._stop.is_set():
                message = consumer.poll(0.2)
                heartbeat.beat()
                now = time.monotonic()
                if now - lag_measured > LAG_INTERVAL_SECONDS:
                    lag_measured = now
                    self._measure_lag(consumer)
                if now - assignment_checked > 1.0:
                    assignment_checked = now
                    if consumer.assignment():
                        unassigned_since = None
                        _stuck_groups.mended(self.group_id)
                    elif unassigned_since is None:
                        unassigned_since = now
                    elif now - unassigned_since > STUCK_AFTER_SECONDS:
                        unassigned_since = now  # looked at again STUCK_AFTER_SECONDS from now
                        if self._left_out(consumer) and self._mend_group(consumer, now):
                            return  # run() closes this consumer and joins the group afresh
                if message is None:
                    continue
                if message.error():
                    log.warning("%s: consumer error: %s", self.topic, message.error())
                    continue
                if self.batch_size > 1:
                    self._push_fetched(consumer, client, message)
                else:
                    self._handle(consumer, client, message)
        self._commit_done(consumer)

    def _left_out(self, consumer: Any) -> bool:
        """True when the topic has a partition for every pusher of the group but this one has
        had none for STUCK_AFTER_SECONDS: a group left in a bad state (seen after the embedded
        broker restarted while the group was joining), not a spare member."""
        from confluent_kafka import KafkaException

        try:  # all topics: asking for one by name would create it on some brokers
            topic = consumer.list_topics(timeout=2.0).topics.get(self.topic)
        except KafkaException:
            return False
        partitions = len(topic.partitions) if topic is not None and not topic.error else 0
        return partitions >= self.group_size

    def _mend_group(self, consumer: Any, now: float) -> bool:
        """True if this pusher is the one to join its stuck group again (after resetting it at
        the broker, every other time)."""
        action = _stuck_groups.claim(self.group_id, now)
        if action is None:
            return False
        position = self._group_position(consumer)
        committed = position[0] if position else None
        if (
            action == "reset"
            and position is not None
            and (committed != _stuck_groups.position(self.group_id) or not position[1])
        ):
            # Its offsets moved (a member elsewhere consumes: these pushers are spares), or no
            # record waits: nothing to mend now.
            _stuck_groups.mended(self.group_id)
            return False
        _stuck_groups.note_position(self.group_id, committed)
        log.warning(
            "%s: no partition for %.0f s although the topic has one for each of %d pushers;"
            " %s", self.topic, STUCK_AFTER_SECONDS, self.group_size,
            "joining the group again" if committed is None or action == "rejoin"
            else "resetting the group",
        )  # fmt: skip
        if action == "reset" and committed is not None:
            self._reset_group(committed)
        return True

    def _group_position(self, consumer: Any) -> tuple[dict[tuple[str, int], int], bool] | None:
        """On the embedded broker only: the group's committed offsets on this topic, and
        whether records wait beyond them (its end offsets are approximate, never too high
        for this). None on any other broker, or when it does not answer."""
        from confluent_kafka import Consumer, TopicPartition

        try:
            metadata = consumer.list_topics(timeout=2)  # all topics: one would be created
            topic = metadata.topics.get(self.topic)
            if metadata.cluster_id != EMBEDDED_CLUSTER_ID or topic is None:
                return None
            keeper = Consumer(consumer_config(self.bootstrap_servers, self.group_id))
            try:  # a consumer of the group that never joins it, to read its offsets
                wanted = [TopicPartition(self.topic, number) for number in topic.partitions]
                committed = {
                    (tp.topic, tp.partition): tp.offset
                    for tp in keeper.committed(wanted, timeout=5)
                    if tp.offset >= 0
                }
                waiting = False
                for partition in wanted:
                    low, high = keeper.get_watermark_offsets(partition, timeout=2)
                    waiting |= high > committed.get((partition.topic, partition.partition), low)
            finally:
                keeper.close()
        except Exception as error:  # cannot tell: only joining again is tried
            log.info("%s: group %s not looked at: %r", self.topic, self.group_id, error)
            return None
        return committed, waiting

    def _reset_group(self, committed: dict[tuple[str, int], int]) -> None:
        """Delete the group at the embedded broker: the one way out once it keeps a leader
        that is gone. The committed offsets go with it: this process's pushers start from the
        ones read just before, and commit them (a member in another process would start from
        the oldest record: duplicates). Never on another broker: a real Kafka refuses to
        delete a group with members, and its groups do not get stuck so."""
        from confluent_kafka.admin import AdminClient

        try:
            admin = AdminClient(admin_config(self.bootstrap_servers))
            deleted = admin.delete_consumer_groups([self.group_id], request_timeout=5)
            deleted[self.group_id].result(10)
        except Exception as error:  # a repair that did not work: the next try joins again
            log.warning("%s: group %s not reset: %r", self.topic, self.group_id, error)
            return
        _stuck_groups.keep(self.group_id, committed, time.monotonic())
        log.warning(
            "%s: group %s was still stuck after a member joined again: reset at the broker,"
            " %d committed offsets kept", self.topic, self.group_id, len(committed),
        )  # fmt: skip

    def on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        """After a reset: start from the offsets kept, and commit them at once, so that the
        next owner of a partition starts there too. An offset beyond the partition's end
        (the broker restarted meanwhile: a new log) is not used."""
        from confluent_kafka import TopicPartition

        now = time.monotonic()
        kept = [_stuck_groups.kept(self.group_id, (p.topic, p.partition), now) for p in partitions]
        if all(offset is None for offset in kept):
            return
        applied = []
        for partition, offset in zip(partitions, kept, strict=True):
            if offset is None:
                continue
            _, high = consumer.get_watermark_offsets(partition, timeout=2)
            if offset <= high:
                partition.offset = offset
                applied.append(TopicPartition(partition.topic, partition.partition, offset))
        consumer.assign(partitions)
        if applied:
            consumer.commit(offsets=applied, asynchronous=False)

    def on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        for partition in partitions:
            self._done.pop((partition.topic, partition.partition), None)
            self._alone_until.pop((partition.topic, partition.partition), None)

    def _commit_done(self, consumer: Any) -> None:
        """On stop: commit every record delivered so far (the commits on the way are
        asynchronous too); close() then waits for them while the broker answers, so the next
        owner of these partitions does not push them again. With the broker gone, they are
        pushed again: duplicates the consumer ignores."""
        from confluent_kafka import KafkaException, TopicPartition

        if not self._done:
            return
        offsets = [
            TopicPartition(topic, part, offset) for (topic, part), offset in self._done.items()
        ]
        try:
            consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as error:
            log.warning("%s: stopped; final commit failed: %s", self.topic, error)

    def _measure_lag(self, consumer: Any) -> None:
        """Records between each owned partition's position and its end, summed per topic over
        this process's pushers. (The embedded broker reports the end wrong: approximate there.)"""
        from confluent_kafka import KafkaException

        lag = 0
        try:
            owned = consumer.assignment()
            for position in consumer.position(owned):
                _, high = consumer.get_watermark_offsets(position, timeout=1.0)
                if position.offset >= 0 and high >= 0:
                    lag += max(high - position.offset, 0)
        except KafkaException as error:
            log.debug("%s: lag not measured: %s", self.topic, error)
            return
        with _LAG_LOCK:
            _LAGS[(self.topic, id(self))] = lag
            total = sum(value for (topic, _), value in _LAGS.items() if topic == self.topic)
        metrics.ADAPTER_LAG.labels(self.topic).set(total)

    def _handle(self, consumer: Any, client: httpx.Client, message: Any) -> bool:
        """Deliver one record, or dead-letter it; True if its partition was set back to the
        record after it (the records fetched behind it come again)."""
        self._server_errors = 0
        request = self._request(message)
        due = due_time(message) if self.honour_due_time and not isinstance(request, str) else None
        tried = due is None or datetime.now(UTC) >= due
        if tried and self._try_once(client, message, request):
            # The fast path: nothing paused, so what was fetched behind this record stays.
            self._commit(consumer, message)
            return False
        # The record must wait (its due time, or a failing sink). Pause every partition this
        # consumer owns and keep polling, so it stays in its group and hands out nothing else
        # meanwhile; then start again exactly where each partition was.
        owned = consumer.assignment()
        positions = consumer.position(owned)
        consumer.pause(owned)
        done = False
        try:
            while due and datetime.now(UTC) < due and not self._stop.is_set():
                self._idle_poll(consumer, min(0.2, (due - datetime.now(UTC)).total_seconds()))
            done = self._deliver_with_backoff(consumer, client, message, request, tried)
            if done:
                self._commit(consumer, message)
        finally:
            for position in positions:
                if (position.topic, position.partition) == (message.topic(), message.partition()):
                    position.offset = message.offset() + 1 if done else message.offset()
            self._resume(consumer, positions)
        return True

    def _push_fetched(self, consumer: Any, client: httpx.Client, first: Any) -> None:
        """`first` and the records already fetched behind it (no waiting for more), up to
        batch_size. A partition's records go together in batches, unless one of them must go
        alone (it is in a range being delivered again alone, or it cannot be made into a
        CloudEvent): then all of that partition's records go alone this time, in order."""
        started = time.monotonic()
        records = [first]
        for message in consumer.consume(self.batch_size - 1, 0):
            if message.error():
                log.warning("%s: consumer error: %s", self.topic, message.error())
            else:
                records.append(message)
        by_partition: dict[tuple[str, int], list[Any]] = {}
        for message in records:
            by_partition.setdefault((message.topic(), message.partition()), []).append(message)
        alone: list[Any] = []
        together: list[tuple[Any, tuple[dict[str, str], bytes]]] = []
        for messages in by_partition.values():
            requests = [self._request(message) for message in messages]
            # Every record is looked at: _goes_alone ends a range once it is passed.
            going_alone = [self._goes_alone(message) for message in messages]
            if any(going_alone) or any(isinstance(request, str) for request in requests):
                alone += messages
            else:
                together += [(m, r) for m, r in zip(messages, requests, strict=True)
                             if not isinstance(r, str)]  # fmt: skip
        if len(together) == 1:
            alone.append(together.pop()[0])
        # Alone first: their partitions are not in the batches, so a batch's rewind never meets
        # a record held here. A delivery that had to wait (it paused, polled and set every
        # partition back where it was) ends the round: what is still held is given back.
        set_back: set[tuple[str, int]] = set()
        held = [m for m, _ in together]
        for index, message in enumerate(alone):
            if self._stop.is_set():
                return  # not committed: delivered again by whoever owns the partition next
            if time.monotonic() - started > HOLD_SECONDS:
                self._give_back(consumer, alone[index:] + held, set_back)
                return
            if self._handle(consumer, client, message):
                set_back.add((message.topic(), message.partition()))
                self._give_back(consumer, alone[index + 1 :] + held, set_back)
                return
        for batch in self._batches(together):
            batch = [(m, r) for m, r in batch if (m.topic(), m.partition()) not in set_back]
            if not batch or self._stop.is_set():
                continue
            if time.monotonic() - started > HOLD_SECONDS:
                self._give_back(consumer, [m for m, _ in batch], set_back)
                continue
            set_back |= self._push_together(consumer, client, batch)

    def _give_back(self, consumer: Any, held: list[Any], set_back: set[tuple[str, int]]) -> None:
        """Set each partition back to the first record held of it, so that they are fetched
        again after a poll (one that keeps this consumer in its group)."""
        from confluent_kafka import TopicPartition

        owned = _owned(consumer)
        first: dict[tuple[str, int], int] = {}
        for message in held:
            key = (message.topic(), message.partition())
            if key in owned and key not in set_back:  # a lost one's new owner starts at its commit
                first[key] = min(first.get(key, message.offset()), message.offset())
        for key, offset in first.items():
            consumer.seek(TopicPartition(*key, offset))  # a failure: run() starts over
        set_back |= first.keys()

    def _goes_alone(self, message: Any) -> bool:
        key = (message.topic(), message.partition())
        until = self._alone_until.get(key)
        if until is not None and message.offset() >= until:
            del self._alone_until[key]
            return False
        return until is not None

    def _batches(
        self, together: list[tuple[Any, tuple[dict[str, str], bytes]]]
    ) -> list[list[tuple[Any, tuple[dict[str, str], bytes]]]]:
        """Consecutive runs of at most batch_bytes (base64 makes the data a third larger)."""
        batches: list[list[tuple[Any, tuple[dict[str, str], bytes]]]] = [[]]
        size = 0
        for message, (headers, body) in together:
            record_size = len(body) * 4 // 3 + sum(len(k) + len(v) + 6 for k, v in headers.items())
            if batches[-1] and size + record_size > self.batch_bytes:
                batches.append([])
                size = 0
            batches[-1].append((message, (headers, body)))
            size += record_size
        return batches

    def _push_together(
        self,
        consumer: Any,
        client: httpx.Client,
        batch: list[tuple[Any, tuple[dict[str, str], bytes]]],
    ) -> set[tuple[str, int]]:
        """One batched push; commits each partition up to its first failed event and rewinds
        it there, so that its records from there on are delivered alone. Returns the
        partitions rewound."""
        from confluent_kafka import TopicPartition

        body = orjson.dumps([structured_event(*request) for _, request in batch])
        metrics.ADAPTER_IN_FLIGHT.inc(len(batch))
        try:
            response = client.post(
                self.sink_url, content=body, headers={"content-type": CLOUDEVENTS_BATCH}
            )
            succeeded = self._batch_results(response, len(batch))
        except httpx.HTTPError as error:
            log.warning("%s: sink unreachable: %s", self.topic, error)
            succeeded = [False] * len(batch)
        finally:
            metrics.ADAPTER_IN_FLIGHT.dec(len(batch))
        done: dict[tuple[str, int], int] = {}
        first_failed: dict[tuple[str, int], int] = {}
        last: dict[tuple[str, int], int] = {}
        delivered = 0
        for (message, _), success in zip(batch, succeeded, strict=True):
            key = (message.topic(), message.partition())
            last[key] = message.offset()
            if key in first_failed:
                continue  # delivered again after the failed one, in order
            if success:
                done[key] = message.offset() + 1
                delivered += 1
            else:
                first_failed[key] = message.offset()
        metrics.ADAPTER_DELIVERIES.labels(self.topic, "delivered").inc(delivered)
        self.delivered += delivered
        # Only for partitions still owned: a revoked one's new owner starts at its commit.
        owned = _owned(consumer)
        done = {key: offset for key, offset in done.items() if key in owned}
        if done:
            offsets = [TopicPartition(*key, offset) for key, offset in done.items()]
            consumer.commit(offsets=offsets, asynchronous=True)
            self._done.update(done)
        for key, offset in first_failed.items():
            if key in owned:
                self._alone_until[key] = last[key] + 1
                consumer.seek(TopicPartition(*key, offset))  # a failure: run() starts over
        if first_failed:
            metrics.ADAPTER_DELIVERIES.labels(self.topic, "failed").inc(len(batch) - delivered)
        return set(first_failed)

    def _batch_results(self, response: httpx.Response, count: int) -> list[bool]:
        """Which events of a batch the sink is done with; none unless it answered a result
        for each (a sink that takes no batches, or is failing, gets them all alone)."""
        results = None
        if response.status_code == 415:  # Unsupported Media Type: a sink that takes no batches
            log.warning("%s: the sink takes no batches: one record per request", self.topic)
            self.batch_size = 1
        if 200 <= response.status_code < 300:
            try:
                results = response.json().get("results")
            except (ValueError, AttributeError):
                results = None
        if not isinstance(results, list) or len(results) != count:
            log.warning(
                "%s: a batch of %d was not taken (HTTP %d): its records go one by one",
                self.topic, count, response.status_code,
            )  # fmt: skip
            return [False] * count
        return [
            isinstance(result, dict) and isinstance(result.get("status"), int)
            and 200 <= result["status"] < 300
            for result in results
        ]  # fmt: skip

    def _request(self, message: Any) -> tuple[dict[str, str], bytes] | str:
        """The HTTP request for a record, or why there can be none."""
        try:
            return cloudevent_request(message, self.source)
        except Exception as error:
            return f"the record cannot be made into a CloudEvent: {error!r}"

    def _try_once(
        self, client: httpx.Client, message: Any, request: tuple[dict[str, str], bytes] | str
    ) -> bool:
        """One attempt; True once the record is done with (delivered, or dead-lettered)."""
        if isinstance(request, str):
            return self._dead_letter(message, request)
        if self._server_errors >= self.max_server_errors:
            return self._dead_letter(
                message, f"the sink failed on the record {self._server_errors} times: HTTP 500"
            )
        headers, body = request
        metrics.ADAPTER_IN_FLIGHT.inc()
        try:
            response = client.post(self.sink_url, headers=headers, content=body)
        except httpx.HTTPError as error:
            log.warning("%s: sink unreachable: %s", self.topic, error)
            metrics.ADAPTER_DELIVERIES.labels(self.topic, "failed").inc()
            return False
        finally:
            metrics.ADAPTER_IN_FLIGHT.dec()
        code = response.status_code
        self._server_errors = self._server_errors + 1 if code == 500 else 0
        if 200 <= code < 300:
            metrics.ADAPTER_DELIVERIES.labels(self.topic, "delivered").inc()
            return True
        if 400 <= code < 500 and code not in RETRYABLE_4XX:
            return self._dead_letter(message, f"the sink rejected the record: HTTP {code}")
        metrics.ADAPTER_DELIVERIES.labels(self.topic, "failed").inc()
        log.warning(
            "%s[%d]@%d: sink answered %d",
            message.topic(), message.partition(), message.offset(), code,
        )  # fmt: skip
        return False

    def _dead_letter(self, message: Any, reason: str) -> bool:
        """Put the raw record on the dead-letter topic; True once the broker acknowledged it."""
        from confluent_kafka import Producer

        log.error("%s[%d]@%d: %s", message.topic(), message.partition(), message.offset(), reason)
        letter = dead_letter_record(
            self.dead_letter_topic,
            raw=message.value() or b"",
            error=reason,
            error_class=Outcome.DEAD_LETTER.value,
            retry_count=0,
            origin=Origin(message.topic(), message.partition(), message.offset()),
            task_id=None,
            item_id=None,
        )
        acknowledged: list[bool] = []
        try:
            if self._producer is None:
                self._producer = Producer(producer_config(self.bootstrap_servers))
            self._producer.produce(
                letter.topic,
                key=letter.key.encode(),
                value=letter.value,
                headers=list(letter.headers.items()),
                on_delivery=lambda error, _: acknowledged.append(error is None),
            )
            self._producer.flush(10)
        except Exception as error:
            log.warning("dead letter not published: %r", error)
        if acknowledged != [True]:
            self._producer = None  # start afresh next time (a broken idempotent producer)
            return False
        metrics.ADAPTER_DELIVERIES.labels(self.topic, "dead-lettered").inc()
        return True

    def _commit(self, consumer: Any, message: Any) -> None:
        consumer.commit(message=message, asynchronous=True)
        self._done[(message.topic(), message.partition())] = message.offset() + 1
        self.delivered += 1

    def _idle_poll(self, consumer: Any, seconds: float) -> None:
        """Serve the group protocol while paused; a record that still arrives (a partition
        assigned meanwhile) is put back, never dropped."""
        from confluent_kafka import TopicPartition

        message = consumer.poll(max(seconds, 0))
        heartbeat.beat()
        if message is not None and not message.error():
            consumer.seek(TopicPartition(message.topic(), message.partition(), message.offset()))

    def _resume(self, consumer: Any, positions: list[Any]) -> None:
        # Partitions revoked meanwhile are left alone: their new owner starts at the committed
        # offsets. A seek that fails on one still owned raises: run() starts over from them.
        assigned = consumer.assignment()
        still_owned = {(tp.topic, tp.partition) for tp in assigned}
        for position in positions:
            if position.offset >= 0 and (position.topic, position.partition) in still_owned:
                consumer.seek(position)
        # All of them: a pause outlives a rebalance that hands a partition back.
        consumer.resume(assigned)

    def _deliver_with_backoff(
        self,
        consumer: Any,
        client: httpx.Client,
        message: Any,
        request: tuple[dict[str, str], bytes] | str,
        wait_first: bool,
    ) -> bool:
        """Try until done (True) or until stopped (False); never skips the record."""
        backoff = self.backoff_initial
        while not self._stop.is_set():
            if wait_first:
                deadline = time.monotonic() + backoff
                while time.monotonic() < deadline and not self._stop.is_set():
                    self._idle_poll(consumer, 0.1)
                backoff = min(backoff * 2, self.backoff_max)
            wait_first = True
            if not self._stop.is_set() and self._try_once(client, message, request):
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
        dead_letter_topic: str = "moderation_dlq",
        batch_size: int = 1,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        retry_group = f"{group_id}-retry"
        self.pushers = [
            TopicPusher(bootstrap_servers, topic, group_id, sink_url=sink_url,
                        dead_letter_topic=dead_letter_topic, group_size=concurrency,
                        batch_size=batch_size)
            for _ in range(concurrency)
        ] + [  # retries one by one: each waits for its own due time
            TopicPusher(bootstrap_servers, retry_topic, retry_group, sink_url=sink_url,
                        dead_letter_topic=dead_letter_topic, honour_due_time=True,
                        group_size=concurrency)
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

    def stop(self, timeout: float = 8.0) -> None:
        """Stop every pusher, waiting at most `timeout` seconds in all (within the 10 s grace of
        compose and podman): a push under way finishes, what was delivered is committed."""
        for pusher in self.pushers:
            pusher.stop()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))
