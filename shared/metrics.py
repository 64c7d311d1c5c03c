"""Prometheus metrics: every metric of every process is declared here, once.

With several worker processes (WORKERS > 1) set PROMETHEUS_MULTIPROC_DIR to an empty folder
before the process starts (the image does): each worker then writes its numbers there and
/metrics adds them up (prometheus-client's multiprocess mode). Without it, one process's own,
in memory: what the image does with one worker, as every update written to a file costs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# HTTP functions
HTTP_REQUESTS = Counter(
    "moderation_http_requests_total",
    "HTTP requests answered, by route template, method and status",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "moderation_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
INFERENCE = Histogram(
    "moderation_inference_seconds",
    "Time of one onnxruntime call (a batch, or a row of a model that is not linear)",
    buckets=(0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05, 0.25),
)
PREDICTIONS = Counter(
    "moderation_predictions_total", "Ads scored, by outcome (violation, ok)", ["outcome"]
)

# The consumer
TASKS = Counter(
    "moderation_tasks_total",
    "Queued ads handled by the consumer, by outcome (completed, duplicate, retried, dead-lettered)",
    ["outcome"],
)
TASK_PROCESSING = Histogram(
    "moderation_task_processing_seconds",
    "Time the consumer took for one delivery",
    buckets=_LATENCY_BUCKETS,
)
TASK_AGE = Histogram(
    "moderation_task_completion_age_seconds",
    "From a task's acceptance to its completion",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)

# The push adapter
ADAPTER_DELIVERIES = Counter(
    "moderation_adapter_deliveries_total",
    "Records pushed to the sink, by topic and result (delivered, failed, dead-lettered)",
    ["topic", "result"],
)
ADAPTER_IN_FLIGHT = Gauge(
    "moderation_adapter_in_flight", "Records being pushed now", multiprocess_mode="livesum"
)
ADAPTER_LAG = Gauge(
    "moderation_adapter_lag_records",
    "Records behind the end of the partitions this adapter owns, by topic",
    ["topic"],
    multiprocess_mode="livesum",
)

# The outbox relay
OUTBOX_BACKLOG = Gauge(
    "moderation_outbox_backlog", "Outbox rows not yet published", multiprocess_mode="max"
)
OUTBOX_OLDEST = Gauge(
    "moderation_outbox_oldest_unpublished_seconds",
    "Age of the oldest outbox row not yet published (0 when none)",
    multiprocess_mode="max",
)
OUTBOX_PUBLISHED = Counter("moderation_outbox_published_total", "Outbox rows published")

# The dead-letter recorder
DEAD_LETTERS_RECORDED = Counter(
    "moderation_dead_letters_recorded_total", "Dead letters whose task the recorder failed"
)


# Observations some modules keep and count in batches (the HTTP requests, single-row scores):
# flush_pending() counts them; shared/http.py calls it with each batch of requests and before
# /metrics answers.
_flushes: list[Callable[[], None]] = []


def on_flush(flush: Callable[[], None]) -> None:
    _flushes.append(flush)


def flush_pending() -> None:
    for flush in _flushes:
        flush()


def exposition() -> tuple[bytes, str]:
    """The text to answer /metrics with, and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def http_recorder() -> Callable[[Iterable[tuple[Any, str, str, Any, int, float, Any]]], None]:
    """Records a batch of answered requests, as (_, route, method, _, status, seconds, _):
    one counter increment per distinct (route, method, status), one observation per request."""
    counters: dict[tuple[str, str, int], Callable[[float], None]] = {}
    durations: dict[str, Callable[[float], None]] = {}

    def record(entries: Iterable[tuple[Any, str, str, Any, int, float, Any]]) -> None:
        counts: dict[tuple[str, str, int], int] = {}
        for _, route, method, _, status, seconds, _ in entries:
            key = (route, method, status)
            counts[key] = counts.get(key, 0) + 1
            observe = durations.get(route)
            if observe is None:
                observe = durations[route] = HTTP_DURATION.labels(route).observe
            observe(seconds)
        for key, count in counts.items():
            inc = counters.get(key)
            if inc is None:
                route, method, status = key
                inc = counters[key] = HTTP_REQUESTS.labels(route, method, str(status)).inc
            inc(count)

    return record
