"""Kafka topic creation and the client configs every process uses.

The defaults suit Apache Kafka, Redpanda and managed Kafka: librdkafka's own, plus what the
project's guarantees rest on (idempotent producer, manual commits, oldest-first). Anything
else, and any override, comes from KAFKA_* environment variables (see
`shared.config.kafka_properties_from`); the embedded broker's tuning reaches the clients the
same way, set by whoever starts that broker (`moderation.dev`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from shared import logs
from shared.config import get_settings

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

__all__ = [
    "DEFAULT_PARTITIONS",
    "KafkaSetupError",
    "admin_config",
    "consumer_config",
    "ensure_topics",
    "producer_config",
]

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 4

# Kafka's own rule for topic names. Tansu accepts anything (even "a/b" or 0
# partitions), so a typo would only fail later on a real cluster: check here.
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


class KafkaSetupError(RuntimeError):
    """Topics could not be listed or created (broker down, refused, timed out)."""


def _client_config(
    role: str, bootstrap_servers: str, defaults: Mapping[str, Any], extra: Mapping[str, Any]
) -> dict[str, Any]:
    """defaults < the caller's extra < KAFKA_* < KAFKA_<ROLE>_* from the environment."""
    properties = get_settings().kafka_client_properties
    return {
        "bootstrap.servers": bootstrap_servers,
        # librdkafka's own messages go through the process's logging, once per problem.
        "logger": logs.kafka_log,
        **defaults,
        **extra,
        **properties.get("all", {}),
        **properties.get(role, {}),
    }


def admin_config(bootstrap_servers: str, **extra: Any) -> dict[str, Any]:
    """Config for an `AdminClient` (topic creation, metadata)."""
    return _client_config("admin", bootstrap_servers, {}, extra)


def producer_config(bootstrap_servers: str, **extra: Any) -> dict[str, Any]:
    """Config for a `Producer`: idempotent, acks=all, failures surface in ~10 s.

    With the embedded broker, a producer that lived through a broker restart is
    broken for good (the new broker does not know its producer id), in one of
    two ways, measured with confluent-kafka 2.16.1 / Tansu 0.6.0:
    - silently: every delivery report fails with `KafkaError._MSG_TIMED_OUT`
      after message.timeout.ms, forever; error_cb only sees `_ALL_BROKERS_DOWN`
      / `_TRANSPORT`, never the cause;
    - fatally (a request was in flight at the restart): poll()/flush() raise
      `KafkaException` with `UNKNOWN_PRODUCER_ID` and `.fatal()` true (it is
      raised, not passed to error_cb), in-flight delivery reports carry
      `UNKNOWN_PRODUCER_ID`, and every later produce() raises `_FATAL`. If a
      delivery callback runs in the same poll it may itself fail with a
      `SystemError` whose `__cause__` is that `KafkaException`.
    Either way: flush what you can, drop the producer and build a new one.
    """
    defaults = {
        # Retries never duplicate or reorder records within a partition.
        "enable.idempotence": True,
        # Implied by idempotence; spelled out because durability depends on it.
        "acks": "all",
        # Batch for up to 15 ms (librdkafka's default is 5): a moderation decision
        # is not latency-critical to the millisecond, and a broker's CPU follows the
        # number of produce requests. Measured on the dev stack at 500 accepts/s:
        # 3.3 ms of CPU per task against 3.6 with 5 ms, accept p99 19 against 27 ms,
        # and 789 against 707 tasks/s when saturated; at 200/s accept -> completed
        # p50 goes from 14 to 22 ms.
        "linger.ms": 15,
        # A record that cannot be delivered fails after 10 s instead of the
        # 300 s default, so callers see a broker outage while it matters (the
        # outbox keeps the task; the relay publishes it later).
        "message.timeout.ms": 10_000,
        # One stuck request is retried well inside message.timeout.ms (default 30 s).
        "request.timeout.ms": 5_000,
        # allow.auto.create.topics stays at the producer default (true): after a
        # Tansu restart the first record recreates its topic (with the broker's
        # 4 partitions) within a second, before ensure_topics() runs. Turning it
        # off left the topics missing for seconds, and a consumer group that
        # rejoined meanwhile was handed an empty assignment that Tansu kept
        # serving after the topic came back (stuck group, measured).
    }
    return _client_config("producer", bootstrap_servers, defaults, extra)


def consumer_config(bootstrap_servers: str, group_id: str, **extra: Any) -> dict[str, Any]:
    """Config for a `Consumer` in group `group_id`; commit offsets yourself.

    Also the config for a consumer that uses `assign()` without a group: the
    client still needs a group.id. Group timings are librdkafka's defaults,
    which every Kafka accepts (a real broker refuses a session.timeout.ms
    below its group.min.session.timeout.ms, 6 s by default); the embedded
    broker needs shorter ones, which its starter sets through KAFKA_CONSUMER_*.
    """
    defaults = {
        # Commit only after a record is handled (at-least-once); auto-commit
        # would commit records that were fetched but not yet processed.
        "enable.auto.commit": False,
        # A new group starts from the oldest record. Never "latest": Tansu
        # reports a wrong end offset, so "latest" can skip or replay records.
        "auto.offset.reset": "earliest",
    }
    config = _client_config("consumer", bootstrap_servers, defaults, extra)
    # Each caller's own group, never one set for every consumer by the environment.
    config["group.id"] = group_id
    return config


def ensure_topics(
    bootstrap_servers: str,
    topics: Mapping[str, int] | Iterable[str],
    partitions: int = DEFAULT_PARTITIONS,
    timeout: float = 10.0,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    `topics` maps name -> partition count, or is a list of names that all get
    `partitions`. Existing topics are left alone (a different partition count
    is only logged: shrinking is impossible and growing is an operator's call).
    Safe to call again, concurrently too, e.g. after a broker came back empty.
    Raises `KafkaSetupError` if the broker does not answer or refuses a topic
    within `timeout` seconds in total, `ValueError` for an invalid request.
    """
    # Imported here, not at the top: functions that only read results never load librdkafka.
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    wanted = _wanted_partitions(topics, partitions)
    deadline = time.monotonic() + timeout
    admin = AdminClient(admin_config(bootstrap_servers))

    # list_topics() without a topic argument does not auto-create anything
    # (list_topics(topic=X) would create X with the broker's default count).
    existing = _existing_topics(admin, bootstrap_servers, deadline)
    for name, count in wanted.items():
        if name in existing and existing[name] != count:
            log.warning(
                "topic %s exists with %d partitions, %d requested; leaving it",
                name,
                existing[name],
                count,
            )
    # Replication is left to the broker's default.replication.factor (1 on Tansu).
    missing = [NewTopic(n, num_partitions=c) for n, c in wanted.items() if n not in existing]
    if not missing:
        return []

    remaining = _remaining(deadline)
    futures = admin.create_topics(missing, operation_timeout=remaining, request_timeout=remaining)
    created: list[str] = []
    failures: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout=_remaining(deadline))
        except KafkaException as exc:
            error = exc.args[0]
            # Someone else (another process, a producer's auto-create) won the race.
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            failures.append(f"{name}: {error}")
        except TimeoutError:
            failures.append(f"{name}: no answer within {timeout:g} s")
        else:
            created.append(name)
    if failures:
        raise KafkaSetupError(
            f"could not create Kafka topics on {bootstrap_servers}: " + "; ".join(failures)
        )

    # A real cluster may answer CreateTopics before its metadata shows the
    # topic; wait until it does so that callers can produce right away.
    while missing_now := set(created) - set(_existing_topics(admin, bootstrap_servers, deadline)):
        if time.monotonic() >= deadline:
            raise KafkaSetupError(
                f"topics {sorted(missing_now)} created on {bootstrap_servers} "
                f"but not visible in metadata within {timeout:g} s"
            )
        time.sleep(0.05)
    log.info("created Kafka topics %s on %s", created, bootstrap_servers)
    return created


def _wanted_partitions(
    topics: Mapping[str, int] | Iterable[str], partitions: int
) -> dict[str, int]:
    """Normalise `topics` to name -> partitions and validate it."""
    if isinstance(topics, str):
        # A bare string is iterable too and would become one topic per letter.
        raise TypeError("topics must be a mapping or an iterable of names, not a str")
    wanted = dict(topics) if isinstance(topics, Mapping) else dict.fromkeys(topics, partitions)
    for name, count in wanted.items():
        if not _TOPIC_NAME.fullmatch(name) or name in {".", ".."}:
            raise ValueError(f"invalid Kafka topic name {name!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"topic {name!r}: partitions must be an int >= 1, got {count!r}")
    return wanted


def _existing_topics(admin: AdminClient, bootstrap_servers: str, deadline: float) -> dict[str, int]:
    """Name -> partition count of the topics the broker has now."""
    from confluent_kafka import KafkaException

    try:
        metadata = admin.list_topics(timeout=_remaining(deadline))
    except KafkaException as exc:
        raise KafkaSetupError(
            f"Kafka at {bootstrap_servers} did not answer a metadata request: {exc.args[0]}"
        ) from exc
    return {
        name: len(meta.partitions)
        for name, meta in metadata.topics.items()
        # A topic can be listed with an error (e.g. being deleted): treat it as absent.
        if meta.error is None
    }


def _remaining(deadline: float) -> float:
    """Seconds left until `deadline`, floored so librdkafka gets a usable timeout."""
    return max(deadline - time.monotonic(), 0.1)
