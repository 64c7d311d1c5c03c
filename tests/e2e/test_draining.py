"""SIGTERM drains: a long-running process finishes what it is doing and stops in time for the
platform's grace period (10 s in compose and podman, 30 s in Kubernetes), even when the servers
it talks to are gone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from moderation.dev.embedded_kafka import CLIENT_TUNING, EmbeddedKafka
from tests.conftest import REPO_ROOT
from tests.helpers import free_port, wait_for

pytestmark = pytest.mark.integration

GRACE_SECONDS = 10


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def row_waiting_in_the_outbox(database_url: str) -> Iterator[None]:
    """A task whose record waits in the outbox (for a topic of its own), so the relay's passes
    try to publish while the broker is down; taken out of everyone's way afterwards."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        (task_id,) = conn.execute(
            "INSERT INTO moderation_results (item_id) VALUES (1) RETURNING id"
        ).fetchone()  # type: ignore[misc]
        conn.execute(
            "INSERT INTO outbox (task_id, topic, key, payload) VALUES (%s, %s, '1', '{}')",
            (task_id, f"draining-{task_id}"),
        )
        try:
            yield
        finally:
            conn.execute("DELETE FROM moderation_results WHERE id = %s", (task_id,))


@pytest.mark.parametrize(
    ("command", "rows_waiting"),
    [
        (["relay"], False),
        (["relay"], True),
        (["dlq-recorder"], False),
        (["adapter", "--sink", "http://127.0.0.1:1"], False),
    ],
    ids=["relay", "relay-with-rows-to-publish", "dlq-recorder", "adapter"],
)
def test_process_stops_on_sigterm_within_the_grace_period_while_the_broker_is_down(
    command: list[str], rows_waiting: bool, postgres_url: str
) -> None:
    with row_waiting_in_the_outbox(postgres_url) if rows_waiting else contextlib.nullcontext():
        stops_in_time_while_the_broker_is_down(command, postgres_url)


def stops_in_time_while_the_broker_is_down(command: list[str], postgres_url: str) -> None:
    kafka = EmbeddedKafka()
    bootstrap = kafka.start()
    ops_port = free_port()
    env = {
        **os.environ, **CLIENT_TUNING,
        "DATABASE_URL": postgres_url, "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "OPS_PORT": str(ops_port), "LOG_FORMAT": "text",
    }  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "moderation", *command], env=env, cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: _healthy(f"http://127.0.0.1:{ops_port}/health"), 30, "it to start")
        kafka.stop()
        time.sleep(6)  # its broker checks are under way now (the relay's run every 5 s)
        process.send_signal(signal.SIGTERM)
        try:  # what compose and podman allow before their SIGKILL, with a margin
            code = process.wait(timeout=GRACE_SECONDS - 2)
        except subprocess.TimeoutExpired:
            code = None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        output = process.stdout.read() if process.stdout else ""
        kafka.close()
    assert code is not None, f"still running {GRACE_SECONDS - 2} s after SIGTERM\n{output}"
    assert code == 0, output
