"""Logs: JSON lines with the request and task at hand, text for people, request ids, one
startup line, librdkafka's repeats held back, the access line."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from shared import logs
from shared.config import get_settings


def record(message: str, level: int = logging.INFO, **attributes: object) -> logging.LogRecord:
    made = logging.LogRecord("moderation.test", level, __file__, 1, message, (), None)
    for name, value in attributes.items():
        setattr(made, name, value)
    return made


def test_json_line_has_timestamp_level_logger_message_and_known_ids() -> None:
    line = logs.JsonFormatter().format(
        record("task done", request_id="r-1", task_id=7, item_id=None, fields={"outcome": "ok"})
    )
    entry = json.loads(line)
    assert entry["level"] == "INFO" and entry["logger"] == "moderation.test"
    assert entry["message"] == "task done"
    assert entry["timestamp"].endswith("+00:00")
    assert entry["request_id"] == "r-1" and entry["task_id"] == 7 and "item_id" not in entry
    assert entry["outcome"] == "ok"


def test_text_line_is_readable_with_ids_as_key_values() -> None:
    line = logs.TextFormatter().format(record("task done", request_id="r-1", task_id=7))
    assert line.endswith("INFO moderation.test: task done request_id=r-1 task_id=7")


@pytest.mark.parametrize(
    ("header", "traceparent", "expected"),
    [
        ("abc-123", None, "abc-123"),
        (None, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
        ("has space", None, "fresh"),
        ("ünïcode", None, "fresh"),
        ("x" * 129, None, "fresh"),
        (None, "not-a-traceparent", "fresh"),
    ],
)
def test_request_id_is_the_clients_when_usable(
    header: str | None, traceparent: str | None, expected: str | None
) -> None:
    got = logs.new_request_id(header, traceparent)
    if expected is None:
        assert got == "4bf92f3577b34da6a3ce929d0e0e4736"
    elif expected == "fresh":
        assert got != header and len(got) == 20 and got.isalnum()
    else:
        assert got == expected


def test_fresh_request_ids_differ() -> None:
    assert len({logs.new_request_id() for _ in range(1000)}) == 1000


def test_once_per_problem_holds_back_repeats_that_differ_only_in_numbers() -> None:
    once = logs.OncePerProblem(window=60)
    first = record("Connect to ipv4#127.0.0.1:1 failed (after 0ms)", logging.ERROR)
    again = record("Connect to ipv4#127.0.0.1:1 failed (after 12ms)", logging.ERROR)
    other = record("Broker transport failure", logging.ERROR)
    assert [once.filter(r) for r in (first, again, other)] == [True, False, True]


def test_access_line_is_one_json_object_with_the_path_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.access.json = True
    logs.access.write([logs.access.format(time.time(), "POST", '/predict"\\\n', 422, 1.25, "r-9")])
    entry = json.loads(capsys.readouterr().out)
    assert entry["message"] == 'POST /predict"\\\n 422 1.25ms'
    assert entry["request_id"] == "r-9" and entry["status"] == 422
    assert entry["logger"] == "moderation.access" and entry["level"] == "INFO"


def test_startup_line_is_one_line_with_settings_and_no_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2@db:5432/app")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "swordfish")
    settings = get_settings()
    logs.configure(settings)
    logs.startup(settings, "predict", port=8080)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "starting" in line]
    entry = json.loads(line)
    assert entry["role"] == "predict" and entry["version"]
    assert entry["settings"]["KAFKA_SASL_PASSWORD"] == "********"
    assert "hunter2" not in line and "swordfish" not in line


def test_access_lines_of_a_new_event_loop_are_written_although_an_earlier_loop_closed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch is written by a timer on the loop of its first request; a timer left on a loop
    that closed never fires, so the next loop's request must set one of its own."""
    from shared import http

    answered = http._Answered()
    answered._signals_hooked = True  # (no server's signal handlers to chain here)
    answered._record = lambda entries: None  # (not counted in the process's metrics)
    monkeypatch.setattr(answered, "FLUSH_AFTER_SECONDS", 0.01)
    monkeypatch.setattr(logs.access, "enabled", True)
    monkeypatch.setattr(logs.access, "json", True)

    async def request(request_id: str, wait: float) -> None:
        answered.add(time.perf_counter(), "/predict", "POST", "/predict", 200, request_id)
        await asyncio.sleep(wait)

    asyncio.run(request("on-a-loop-that-closes", wait=0))  # its timer never fires
    asyncio.run(request("on-the-next-loop", wait=0.2))  # its timer is due first
    ids = [json.loads(line)["request_id"] for line in capsys.readouterr().out.splitlines()]
    assert ids == ["on-a-loop-that-closes", "on-the-next-loop"]


def test_access_line_duration_has_two_decimals(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(logs.access, "json", True)
    logs.access.write([logs.access.format(time.time(), "GET", "/health", 200, 0.5, "r-1")])
    entry = json.loads(capsys.readouterr().out)
    assert entry["message"] == "GET /health 200 0.50ms" and entry["duration_ms"] == 0.5
