"""SIGTERM drains: a long-running process finishes what it is doing and stops in time for the
platform's grace period (10 s in compose and podman, 30 s in Kubernetes), even when the servers
it talks to are gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
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


@pytest.mark.parametrize(
    "command",
    [["relay"], ["dlq-recorder"], ["adapter", "--sink", "http://127.0.0.1:1"]],
    ids=["relay", "dlq-recorder", "adapter"],
)
def test_process_stops_on_sigterm_within_the_grace_period_while_the_broker_is_down(
    command: list[str], postgres_url: str
) -> None:
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
