"""Logging for every process: JSON lines on stdout (LOG_FORMAT=json, the default) or readable
text (LOG_FORMAT=text, what `moderation dev` uses), with the request and task at hand on every
line, one startup line per process, and librdkafka's messages once per problem."""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

from shared.config import Settings, settings_or_exit

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
task_id: ContextVar[int | None] = ContextVar("task_id", default=None)
item_id: ContextVar[int | None] = ContextVar("item_id", default=None)
_CONTEXT = (("request_id", request_id), ("task_id", task_id), ("item_id", item_id))

log = logging.getLogger("moderation")
kafka_log = logging.getLogger("librdkafka")
REPEATING_LOGGERS = ("librdkafka", "psycopg.pool", "shared.db", "shared.kafka")

# A request id we accept from a client: printable ASCII without spaces, quotes or backslashes
# (it is written into JSON log lines as it is), at most 128 characters.
_REQUEST_ID = re.compile(r"[!#-\[\]-~]{1,128}")
# W3C traceparent: version-traceid-parentid-flags; its trace id names the request.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_INVALID_TRACE_ID = "0" * 32  # W3C: all zeros is not a trace id


# Fresh request ids: a random prefix per process and a counter (a uuid4 per request costs
# ten times as much, and these are as unique for following a request through the logs).
_ID_PREFIX = uuid.uuid4().hex[:12]
_ids = itertools.count(1)


def new_request_id(header: str | None = None, traceparent: str | None = None) -> str:
    """The client's X-Request-ID if it is usable, else the trace id of its traceparent, else a
    fresh one."""
    if header and _REQUEST_ID.fullmatch(header):
        return header
    found = _TRACEPARENT.fullmatch(traceparent.strip()) if traceparent else None
    if found and found.group(1) != _INVALID_TRACE_ID:
        return found.group(1)
    return f"{_ID_PREFIX}{next(_ids):08x}"


class _ContextFilter(logging.Filter):
    """Puts the request id, task id and item id of the current context on each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT:
            if not hasattr(record, name):
                setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, the context ids that are
    known, the fields a call passed as `extra={"fields": {...}}`, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, _ in _CONTEXT:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = [(name, getattr(record, name, None)) for name, _ in _CONTEXT]
        pairs += list((getattr(record, "fields", None) or {}).items())
        extras = " ".join(f"{key}={value}" for key, value in pairs if value is not None)
        return f"{line} {extras}" if extras else line


class OncePerProblem(logging.Filter):
    """Lets a message through once per `window` seconds; numbers in it do not make it new
    (librdkafka repeats "Connect to ... failed" with counters and timings)."""

    def __init__(self, window: float = 60.0) -> None:
        super().__init__()
        self.window = window
        self._seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = re.sub(r"\d+", "#", f"{record.levelno} {record.getMessage()}")
        now = time.monotonic()
        if now - self._seen.get(key, -self.window) < self.window:
            return False
        self._seen[key] = now
        if len(self._seen) > 1000:  # never grows without bound
            self._seen.clear()
        return True


class _AccessLog:
    """How access lines look and where they go: one line per HTTP request, in the configured
    format, written in batches (shared/http.py keeps them) and not through `logging`, whose
    locks and one write per record cost a third of a ~160 µs request."""

    def __init__(self) -> None:
        self.enabled = False
        self.json = True
        self._second = -1
        self._second_text = ""
        self._milli = -1
        self._stamp = ""
        # The constant middle of a JSON line per (method, path, status), path JSON-escaped.
        self._middles: dict[tuple[str, str, int], str] = {}

    def _timestamp(self, now: float) -> str:
        """UTC, to the millisecond; formatted once a millisecond (lines of one flush mostly
        share it), the date and time part once a second."""
        milli = int(now * 1000)
        if milli != self._milli:
            self._milli = milli
            second, rest = divmod(milli, 1000)
            if second != self._second:
                self._second = second
                self._second_text = datetime.fromtimestamp(second, UTC).strftime(
                    "%Y-%m-%dT%H:%M:%S"
                )
            self._stamp = f"{self._second_text}.{rest:03d}+00:00"
        return self._stamp

    def format(
        self, now: float, method: str, path: str, status: int, ms: float, rid: str | None
    ) -> str:
        """One line: `now` is a time.time(), `ms` the duration in milliseconds."""
        if not self.json:
            if not path.isprintable():  # a tab or line break must not break the line
                path = path.encode("unicode_escape").decode()
            return (
                f"{self._timestamp(now)} INFO moderation.access: {method} {path} {status}"
                f" {ms:.2f}ms request_id={rid}"
            )
        # Formatted by hand, not as a dict through orjson (a third of the cost). Only the path
        # (and a method outside the usual ones) can need JSON escaping: done once per route.
        middle = self._middles.get((method, path, status))
        if middle is None:
            where = orjson.dumps(f"{method} {path}").decode()[1:-1]
            middle = f'"level":"INFO","logger":"moderation.access","message":"{where} {status} '
            if len(self._middles) < 1000:  # the paths a function serves, not every one
                self._middles[(method, path, status)] = middle
        return (
            f'{{"timestamp":"{self._timestamp(now)}",{middle}{ms:.2f}ms",'
            f'"request_id":"{rid}","status":{status},"duration_ms":{ms:.2f}}}'
        )

    def write(self, lines: list[str]) -> None:
        if lines:
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()


access = _AccessLog()


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, so that configuring again replaces it and leaves other handlers alone. Writes to
    whatever sys.stdout is at the time (a test runner swaps it, and closes its own)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure(settings: Settings) -> None:
    """Route every logger of the process to stdout in the configured format (idempotent)."""
    handler = _StdoutHandler()
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _StdoutHandler)]
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    access.enabled = settings.access_log
    access.json = settings.log_format == "json"
    # Loggers that repeat one problem many times a second while a server is down: librdkafka,
    # the pool's reconnect attempts, and each request that finds no connection.
    for name in REPEATING_LOGGERS:
        repeating = logging.getLogger(name)
        if not any(isinstance(f, OncePerProblem) for f in repeating.filters):
            repeating.addFilter(OncePerProblem())


def startup(settings: Settings, role: str, **details: Any) -> None:
    """The one line a process prints when it starts: who it is, with which settings."""
    fields = {
        "role": role,
        "version": importlib.metadata.version("ad-moderation"),
        **details,
        "settings": settings.redacted(),
    }
    if settings.log_format == "json":
        log.info("starting %s", role, extra={"fields": fields})
    else:  # one line still, settings as compact JSON
        settings_json = json.dumps(fields.pop("settings"), default=str, separators=(",", ":"))
        log.info("starting %s settings=%s", role, settings_json, extra={"fields": fields})


def start(role: str, needs_model: bool = False) -> Settings:
    """Process start of a function: settings (or one line and exit), logging, startup line."""
    settings = settings_or_exit(needs_model=needs_model)
    configure(settings)
    details: dict[str, Any] = {"port": settings.port}
    if needs_model:
        try:
            metadata = json.loads(settings.model_path.with_suffix(".json").read_text())
            details["model_version"] = metadata.get("version")
        except (OSError, ValueError):  # said again, with the reason, when the model loads
            details["model_version"] = None
    startup(settings, role, **details)
    return settings
