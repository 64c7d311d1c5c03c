"""Real functions-framework (gunicorn + uvicorn worker) processes, called over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from moderation.dev.stack import function_command
from tests.conftest import REPO_ROOT, insert_ad
from tests.helpers import free_port, wait_for

pytestmark = pytest.mark.integration

AD = {
    "seller_id": 1, "is_verified_seller": False, "item_id": 1, "name": "Phone",
    "description": "Test Description", "category": 1, "images_qty": 0,
}  # fmt: skip


def _health(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def served_predict(
    postgres_url: str, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": postgres_url,
        "WORKERS": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),  # as the image sets it
    }
    (tmp_path / "metrics").mkdir()
    with (tmp_path / "stdout.log").open("wb") as stdout:
        process = subprocess.Popen(
            function_command("predict", port), env=env, cwd=REPO_ROOT, stdout=stdout
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is not None or _health(base), 30, "predict to serve")
        assert process.poll() is None, "functions-framework exited at start"
        yield base, process
    finally:
        # SIGTERM, not SIGKILL: a killed gunicorn master leaves its workers running.
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def test_served_predict_answers_over_http_with_two_workers(served_predict, postgres_url) -> None:
    base, _ = served_predict
    ad = insert_ad(postgres_url, is_verified_seller=False, images_qty=0)
    with httpx.Client(base_url=base, timeout=10) as client:
        # Several requests so both forked workers are likely to answer at least once.
        bodies = [client.post("/predict", json=ad).json() for _ in range(20)]
        assert all(body["is_violation"] is True for body in bodies)
        stored = client.post("/moderation/simple_predict", params={"item_id": ad["item_id"]})
        assert stored.status_code == 200
        assert stored.json()["probability"] == bodies[0]["probability"]
        assert client.get("/ready").json()["status"] == "ready"
        assert client.post("/predict", content=b"{").status_code == 422


def test_served_predict_metrics_add_up_every_worker(served_predict) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    base, _ = served_predict
    with httpx.Client(base_url=base, timeout=10) as client:
        for _ in range(40):  # new connections: both workers answer some
            with httpx.Client(base_url=base, timeout=10) as one:
                assert one.post("/predict", content=b"{").status_code == 422

        def counted() -> float:
            text = client.get("/metrics").text
            return sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "moderation_http_requests_total"
                and sample.labels == {"route": "/predict", "method": "POST", "status": "422"}
            )

        # The worker answering /metrics counts its own requests at once, the other within 0.5 s.
        wait_for(lambda: counted() == 40 or None, 5, "40 requests counted across both workers")
        assert counted() == 40


def test_served_predict_stops_on_sigterm_with_its_last_requests_counted_and_logged(
    served_predict, tmp_path: Path
) -> None:
    """Metrics and access lines are written in batches; SIGTERM writes what is pending (the
    worker ends by the signal, without running atexit)."""
    from prometheus_client import CollectorRegistry, multiprocess

    base, process = served_predict
    for number in range(3):
        answer = httpx.post(f"{base}/predict", json=AD, headers={"X-Request-ID": f"last-{number}"})
        assert answer.status_code == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    log = (tmp_path / "stdout.log").read_text()
    for number in range(3):
        assert f'"request_id":"last-{number}","status":200' in log
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path / "metrics"))
    counted = registry.get_sample_value(
        "moderation_http_requests_total", {"route": "/predict", "method": "POST", "status": "200"}
    )
    assert counted == 3


def test_served_predict_answers_a_request_in_flight_at_sigterm(served_predict) -> None:
    """A request whose body is still arriving when SIGTERM lands is answered, then it stops."""
    base, process = served_predict
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps(AD).encode()
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        time.sleep(0.3)  # the worker has the request line and headers: it is in flight
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert process.poll() is None, "stopped with a request in flight"
        connection.sendall(body[10:])
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK", answer
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["is_violation"] is True
    assert process.wait(timeout=15) == 0


@pytest.mark.parametrize(
    "target", ["predict", "async_predict", "get_result", "moderation_consumer"]
)
def test_function_module_import_opens_nothing(target: str) -> None:
    """functions-framework imports main.py before forking: no threads, no ORT, no pool yet."""
    code = (
        "import sys, threading, runpy\n"
        f"runpy.run_path('functions/{target}/main.py')\n"
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported'\n"
        "assert 'sklearn' not in sys.modules, 'scikit-learn imported'\n"
        "from shared import db, kafka, model\n"
        "assert db._pool is None and model._model is None and kafka._publisher is None\n"
        "print(threading.active_count())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    *startup, threads = result.stdout.strip().splitlines()
    assert threads == "1"
    assert [json.loads(line)["message"] for line in startup] == [f"starting {target}"]


def test_function_with_bad_configuration_exits_with_one_line() -> None:
    env = {**os.environ, "MAX_RETRIES": "many"}
    result = subprocess.run(
        function_command("predict", free_port()),
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "invalid configuration: MAX_RETRIES" in result.stderr
