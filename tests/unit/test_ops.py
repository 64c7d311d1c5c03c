"""The ops endpoints of the processes that are not functions: /health, /ready, /metrics."""

from __future__ import annotations

import httpx
import pytest

from moderation import heartbeat, ops
from tests.helpers import free_port


@pytest.fixture
def ops_server(monkeypatch: pytest.MonkeyPatch):
    checks = {"broker": True, "database": True}
    monkeypatch.setattr(heartbeat, "_last_beat", None)
    server = ops.serve(free_port(), "relay", lambda: dict(checks))
    yield f"http://127.0.0.1:{server.server_address[1]}", checks
    server.shutdown()
    server.server_close()


def test_ops_health_follows_the_heartbeat(ops_server) -> None:
    base, _ = ops_server
    assert httpx.get(f"{base}/health").status_code == 503  # no beat yet
    heartbeat.beat()
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}


def test_ops_ready_names_the_failing_check(ops_server) -> None:
    base, checks = ops_server
    assert httpx.get(f"{base}/ready").status_code == 200
    checks["database"] = False
    response = httpx.get(f"{base}/ready")
    assert response.status_code == 503
    assert response.json()["checks"] == {"broker": "ok", "database": "unavailable"}


def test_ops_metrics_and_wrong_methods(ops_server) -> None:
    base, _ = ops_server
    metrics = httpx.get(f"{base}/metrics")
    assert metrics.status_code == 200 and "moderation_outbox_backlog" in metrics.text
    response = httpx.post(f"{base}/health")
    assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"
    assert httpx.get(f"{base}/nope").status_code == 404
