"""moderation_consumer through functions-framework's app, against the real PostgreSQL and broker.

Records arrive as CloudEvents in every shape a sink sees: binary mode with the project's own
ce_ attributes, structured mode, and a plain record wrapped the way KafkaSource wraps it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import datetime

import orjson
import psycopg
import pytest
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from moderation.dead_letters import record_failure
from moderation.dev.embedded_postgres import EmbeddedPostgres
from shared.config import get_settings
from tests.conftest import Topics, insert_ad

pytestmark = pytest.mark.integration


def insert_task(database_url: str, item_id: int) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "INSERT INTO moderation_results (item_id) VALUES (%s) RETURNING id", (item_id,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def task_row(database_url: str, task_id: int) -> dict:
    with psycopg.connect(database_url, row_factory=psycopg.rows.dict_row) as conn:
        row = conn.execute("SELECT * FROM moderation_results WHERE id = %s", (task_id,)).fetchone()
    assert row is not None
    return row


def binary_event(data: dict | bytes, task_id: int | str = 1) -> tuple[dict, bytes]:
    event = CloudEvent(
        {"type": "ad.moderation.requested", "source": "/tests", "id": str(task_id)}, data
    )
    return to_binary(event)


def kafkasource_event(value: bytes, partition: int = 0, offset: int = 7) -> tuple[dict, bytes]:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": f"partition:{partition}/offset:{offset}",
        "ce-source": "/apis/v1/namespaces/default/kafkasources/moderation#moderation",
        "ce-type": "dev.knative.kafka.event",
        "ce-subject": f"partition:{partition}#{offset}",
    }
    return headers, value


@pytest.fixture
def post(
    database_url: str, kafka_topics: Topics, make_client: Callable[[str], TestClient]
) -> Callable[[tuple[dict, bytes]], int]:
    client = make_client("moderation_consumer")

    def send(event: tuple[dict, bytes]) -> int:
        headers, body = event
        return client.post("/", headers=headers, content=body).status_code

    return send


def test_consumer_completes_pending_task_and_produces_nothing(
    post, database_url: str, kafka_topics: Topics
) -> None:
    ad = insert_ad(database_url, is_verified_seller=False, images_qty=0)
    task_id = insert_task(database_url, ad["item_id"])
    message = {"item_id": ad["item_id"], "task_id": task_id, "retry_count": 0}
    assert post(binary_event(message, task_id)) == 200
    row = task_row(database_url, task_id)
    assert row["status"] == "completed"
    assert row["is_violation"] is True
    assert row["probability"] == pytest.approx(0.7694, abs=1e-3)
    assert row["model_version"] and row["processed_at"] is not None
    assert kafka_topics.read(kafka_topics.retry) == []
    assert kafka_topics.read(kafka_topics.dlq) == []


def test_consumer_accepts_structured_mode(post, database_url: str) -> None:
    ad = insert_ad(database_url)
    task_id = insert_task(database_url, ad["item_id"])
    event = CloudEvent(
        {"type": "ad.moderation.requested", "source": "/tests"},
        {"item_id": ad["item_id"], "task_id": task_id, "retry_count": 0},
    )
    assert post(to_structured(event)) == 200
    assert task_row(database_url, task_id)["status"] == "completed"


def test_consumer_accepts_kafkasource_wrapped_seed_record_without_task_id(
    post, database_url: str
) -> None:
    ad = insert_ad(database_url)
    older = insert_task(database_url, ad["item_id"])
    newer = insert_task(database_url, ad["item_id"])
    value = orjson.dumps({"item_id": ad["item_id"], "timestamp": "2024-01-01T00:00:00"})
    assert post(kafkasource_event(value)) == 200
    assert task_row(database_url, older)["status"] == "completed"
    assert task_row(database_url, newer)["status"] == "pending"


def test_consumer_seed_record_for_item_without_task_creates_one(post, database_url: str) -> None:
    ad = insert_ad(database_url)
    assert post(kafkasource_event(orjson.dumps({"item_id": ad["item_id"]}))) == 200
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT status FROM moderation_results WHERE item_id = %s", (ad["item_id"],)
        ).fetchall()
    assert rows == [("completed",)]


def test_consumer_two_pending_tasks_message_for_second_leaves_first(
    post, database_url: str
) -> None:
    ad = insert_ad(database_url)
    first = insert_task(database_url, ad["item_id"])
    second = insert_task(database_url, ad["item_id"])
    assert post(binary_event({"item_id": ad["item_id"], "task_id": second}, second)) == 200
    assert task_row(database_url, second)["status"] == "completed"
    assert task_row(database_url, first)["status"] == "pending"


def test_consumer_missing_item_fails_task_with_one_dead_letter_and_no_retry(
    post, database_url: str, kafka_topics: Topics
) -> None:
    task_id = insert_task(database_url, 2_000_000_001)
    message = {"item_id": 2_000_000_001, "task_id": task_id, "retry_count": 0}
    assert post(binary_event(message, task_id)) == 200
    row = task_row(database_url, task_id)
    assert row["status"] == "failed"
    assert "not found" in row["error_message"]
    (dead,) = kafka_topics.read(kafka_topics.dlq, expect=1)
    value = orjson.loads(dead.value())
    assert value["original_message"] == message
    assert "not found" in value["error"]
    assert value["retry_count"] == 0
    assert value["error_class"] == "permanent"
    assert value["task_id"] == task_id
    assert kafka_topics.read(kafka_topics.retry) == []


def test_consumer_duplicate_delivery_of_finished_task_changes_nothing(
    post, database_url: str, kafka_topics: Topics
) -> None:
    ad = insert_ad(database_url)
    task_id = insert_task(database_url, ad["item_id"])
    message = {"item_id": ad["item_id"], "task_id": task_id}
    assert post(binary_event(message, task_id)) == 200
    before = task_row(database_url, task_id)
    with psycopg.connect(database_url) as conn:  # the ad changes; a redelivery must not rescore
        conn.execute("UPDATE advertisements SET images_qty = 9 WHERE id = %s", (ad["item_id"],))
    assert post(binary_event(message, task_id)) == 200
    assert task_row(database_url, task_id) == before
    assert kafka_topics.read(kafka_topics.dlq) == []
    assert kafka_topics.read(kafka_topics.retry) == []


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        (b"{this is not json", "utf-8"),
        (b'{"task_id": 5, "retry_count": 0}', "utf-8"),
        (b'{"item_id": "seven"}', "utf-8"),
        (b"\xff\xfe\x00binary", "base64"),
        (b"", "utf-8"),
    ],
)
def test_consumer_poison_message_goes_to_dlq_with_raw_payload(
    post, kafka_topics: Topics, body: bytes, encoding: str
) -> None:
    assert post(kafkasource_event(body, partition=1, offset=42)) == 200
    (dead,) = kafka_topics.read(kafka_topics.dlq, expect=1)
    value = orjson.loads(dead.value())
    assert value["raw_payload_encoding"] == encoding
    raw = value["raw_payload"]
    raw_bytes = base64.b64decode(raw) if encoding == "base64" else raw.encode()
    if value["original_message"] is None:
        assert raw_bytes == body  # what cannot be parsed is kept byte for byte
    else:  # JSON that is not a valid message: the CloudEvents SDK parsed it, same content
        assert orjson.loads(raw_bytes) == orjson.loads(body) == value["original_message"]
    assert value["error_class"] == "permanent"
    assert (value["origin_topic"], value["origin_partition"], value["origin_offset"]) == (
        "moderation",
        1,
        42,
    )
    assert kafka_topics.read(kafka_topics.retry) == []


def test_consumer_retryable_error_publishes_one_retry_and_keeps_task_pending(
    kafka_topics: Topics,
    disposable_postgres: EmbeddedPostgres,
    make_client: Callable[[str], TestClient],
) -> None:
    ad = insert_ad(disposable_postgres.url)
    task_id = insert_task(disposable_postgres.url, ad["item_id"])
    client = make_client("moderation_consumer")
    disposable_postgres.stop()
    message = {"item_id": ad["item_id"], "task_id": task_id, "retry_count": 0,
               "timestamp": "2020-01-01T00:00:00+00:00"}  # fmt: skip
    headers, body = binary_event(message, task_id)
    assert client.post("/", headers=headers, content=body).status_code == 200

    (retry,) = kafka_topics.read(kafka_topics.retry, expect=1)
    value = orjson.loads(retry.value())
    assert (value["item_id"], value["task_id"], value["retry_count"]) == (ad["item_id"], task_id, 1)
    assert value["timestamp"] != message["timestamp"]
    retry_headers = {k: v.decode() for k, v in retry.headers()}
    assert datetime.fromisoformat(retry_headers["ce_dueat"]) > datetime.fromisoformat(
        value["timestamp"]
    )
    assert kafka_topics.read(kafka_topics.dlq) == []
    disposable_postgres.start()
    assert task_row(disposable_postgres.url, task_id)["status"] == "pending"


def test_consumer_after_last_retry_dead_letters_and_recorder_fails_task_once_database_is_back(
    kafka_topics: Topics,
    disposable_postgres: EmbeddedPostgres,
    make_client: Callable[[str], TestClient],
) -> None:
    ad = insert_ad(disposable_postgres.url)
    task_id = insert_task(disposable_postgres.url, ad["item_id"])
    client = make_client("moderation_consumer")
    disposable_postgres.stop()
    message = {"item_id": ad["item_id"], "task_id": task_id, "retry_count": 3}
    headers, body = binary_event(message, task_id)
    # Given up: the dead letter is the durable outcome, so the answer is 2xx.
    assert client.post("/", headers=headers, content=body).status_code == 200
    (dead,) = kafka_topics.read(kafka_topics.dlq, expect=1)
    letter = orjson.loads(dead.value())
    assert (letter["task_id"], letter["retry_count"], letter["error_class"]) == (
        task_id,
        3,
        "retryable",
    )
    assert kafka_topics.read(kafka_topics.retry) == []

    disposable_postgres.start()
    assert task_row(disposable_postgres.url, task_id)["status"] == "pending"
    with psycopg.connect(disposable_postgres.url, autocommit=True) as conn:
        assert record_failure(conn, dead.value()) is True
        assert record_failure(conn, dead.value()) is False  # a repeated letter changes nothing
    row = task_row(disposable_postgres.url, task_id)
    assert row["status"] == "failed"
    assert "Database is not available" in row["error_message"]
    assert "3 retries" in row["error_message"]


@pytest.fixture
def stranded(
    disposable_postgres: EmbeddedPostgres,
    monkeypatch: pytest.MonkeyPatch,
    make_client: Callable[[str], TestClient],
) -> tuple[TestClient, dict]:
    """The consumer with a pending task, then neither its database nor any broker: nothing it
    can do for the task is durable. (client, the task's record)"""
    ad = insert_ad(disposable_postgres.url)
    task_id = insert_task(disposable_postgres.url, ad["item_id"])
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("DURABLE_PUBLISH_WAIT_SECONDS", "1")
    get_settings.cache_clear()
    client = make_client("moderation_consumer")
    disposable_postgres.stop()
    return client, {"item_id": ad["item_id"], "task_id": task_id}


def test_consumer_answers_5xx_when_retry_cannot_be_published(
    stranded: tuple[TestClient, dict],
) -> None:
    client, record = stranded
    headers, body = binary_event(record, record["task_id"])
    response = client.post("/", headers=headers, content=body)
    assert response.status_code == 503  # 5xx: the record is delivered again
    assert response.json() == {"detail": "Message broker is not available"}


def test_consumer_record_naming_another_items_task_leaves_that_task_alone(
    post, database_url: str, kafka_topics: Topics
) -> None:
    ad, other = insert_ad(database_url), insert_ad(database_url)
    task_id = insert_task(database_url, other["item_id"])
    assert post(binary_event({"item_id": ad["item_id"], "task_id": task_id}, task_id)) == 200
    assert task_row(database_url, task_id)["status"] == "pending"
    (letter,) = kafka_topics.read(kafka_topics.dlq, expect=1)
    assert orjson.loads(letter.value())["task_id"] is None


def test_consumer_absurd_retry_count_is_a_poison_message(post, kafka_topics: Topics) -> None:
    assert (
        post(kafkasource_event(b'{"item_id": 1, "task_id": 1, "retry_count": 2147483647}')) == 200
    )
    (letter,) = kafka_topics.read(kafka_topics.dlq, expect=1)
    assert "retry_count" in orjson.loads(letter.value())["error"]


def test_consumer_logs_the_outcome_with_the_request_id_of_the_event(
    post, database_url: str, kafka_topics: Topics, caplog: pytest.LogCaptureFixture
) -> None:
    ad = insert_ad(database_url)
    task_id = insert_task(database_url, ad["item_id"])
    headers, body = binary_event({"item_id": ad["item_id"], "task_id": task_id}, task_id)
    with caplog.at_level("INFO", logger="shared.consumer"):
        assert post(({**headers, "ce-requestid": "req-77"}, body)) == 200
    (line,) = [r for r in caplog.records if r.getMessage() == f"task {task_id}: completed"]
    assert (line.request_id, line.task_id, line.item_id) == ("req-77", task_id, ad["item_id"])


def test_consumer_serves_health_and_readiness(make_client, database_url: str) -> None:
    client = make_client("moderation_consumer")
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"model": "ok", "database": "ok"}


def test_consumer_rejects_what_is_not_a_cloudevent_with_400(make_client) -> None:
    response = make_client("moderation_consumer").post("/", content=b"plain bytes")
    assert response.status_code == 400  # a sink's "never deliver this again"
    assert "not a CloudEvent" in response.json()["detail"]


def test_consumer_dead_letters_a_record_near_the_size_limit_truncated_with_its_hash(
    post, kafka_topics: Topics
) -> None:
    import hashlib

    raw = b"\xfe" + b"not json " * 111_000  # ~1 MB: base64 in a letter would be ~1.3 MB
    assert post(kafkasource_event(raw)) == 200
    (letter,) = kafka_topics.read(kafka_topics.dlq, expect=1)
    value = orjson.loads(letter.value())
    assert len(letter.value()) < 1_000_000
    assert value["raw_payload_truncated"] is True
    assert value["raw_payload_size"] == len(raw)
    assert value["raw_payload_sha256"] == hashlib.sha256(raw).hexdigest()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    value=st.binary(max_size=200)
    | st.dictionaries(
        st.sampled_from(["item_id", "task_id", "retry_count", "timestamp", "other"]),
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=20),
    ).map(lambda data: json.dumps(data).encode())  # orjson refuses ints over 64 bits
)
def test_consumer_any_record_is_done_with_never_a_5xx(post, value: bytes) -> None:
    """Whatever a record holds, the consumer completes it or dead-letters it (2xx), so the
    records behind it are processed; a 5xx here would redeliver it forever."""
    assert post(kafkasource_event(value)) == 200


def batch_event(data: dict | bytes, event_id: str, **attributes: str) -> dict:
    """One structured-mode event of a batch, its data as the push adapter sends it."""
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    return {"specversion": "1.0", "id": event_id, "source": "/tests",
            "type": "ad.moderation.requested", "datacontenttype": "application/json",
            "data_base64": base64.b64encode(raw).decode(), **attributes}  # fmt: skip


BATCH = {"content-type": "application/cloudevents-batch+json"}


def test_consumer_batch_answers_a_result_per_event_in_order(
    make_client, database_url: str, kafka_topics: Topics
) -> None:
    ads = [insert_ad(database_url, images_qty=n) for n in range(3)]
    tasks = [insert_task(database_url, ad["item_id"]) for ad in ads]
    gone = insert_task(database_url, insert_ad(database_url)["item_id"])
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE moderation_results SET status = 'failed', error_message = 'x',"
            " processed_at = now() WHERE id = %s",
            (gone,),
        )
    events = [
        batch_event({"item_id": ads[0]["item_id"], "task_id": tasks[0]}, "a"),
        batch_event(b"not json", "poison"),
        {"specversion": "1.0", "source": "/tests", "type": "t"},  # no id
        batch_event({"item_id": ads[1]["item_id"], "task_id": tasks[1]}, "b", requestid="r-b"),
        batch_event({"item_id": 1, "task_id": gone}, "finished-already"),
        batch_event({"item_id": ads[2]["item_id"], "task_id": tasks[2], "retry_count": 2}, "c"),
        batch_event({"item_id": ads[0]["item_id"], "task_id": tasks[0]}, "a-again"),
    ]
    response = make_client("moderation_consumer").post("/", headers=BATCH, json=events)
    assert response.status_code == 200
    assert response.json()["results"] == [
        {"id": "a", "status": 200, "outcome": "completed"},
        {"id": "poison", "status": 200, "outcome": "dead-lettered"},
        {"id": None, "status": 400, "detail": "Bad Request: not a CloudEvent: no id"},
        {"id": "b", "status": 200, "outcome": "completed"},
        {"id": "finished-already", "status": 200, "outcome": "duplicate"},
        {"id": "c", "status": 200, "outcome": "completed"},
        {"id": "a-again", "status": 200, "outcome": "duplicate"},
    ]
    rows = [task_row(database_url, task_id) for task_id in tasks]
    assert [row["status"] for row in rows] == ["completed"] * 3
    assert [row["attempts"] for row in rows] == [1, 1, 3]
    # The same scores as one by one (onnxruntime for the batch, the linear path alone).
    single = insert_task(database_url, ads[1]["item_id"])
    headers, body = binary_event({"item_id": ads[1]["item_id"], "task_id": single}, single)
    assert make_client("moderation_consumer").post("/", headers=headers, content=body).is_success
    alone = task_row(database_url, single)
    assert rows[1]["is_violation"] == alone["is_violation"]
    assert rows[1]["probability"] == pytest.approx(alone["probability"], abs=1e-12)
    (letter,) = kafka_topics.read(kafka_topics.dlq, expect=1)
    assert orjson.loads(letter.value())["raw_payload"] == "not json"


def test_consumer_batch_during_a_database_outage_retries_every_event(
    kafka_topics: Topics,
    disposable_postgres: EmbeddedPostgres,
    make_client: Callable[[str], TestClient],
) -> None:
    ads = [insert_ad(disposable_postgres.url) for _ in range(3)]
    tasks = [insert_task(disposable_postgres.url, ad["item_id"]) for ad in ads]
    client = make_client("moderation_consumer")
    disposable_postgres.stop()
    events = [
        batch_event({"item_id": ad["item_id"], "task_id": task_id}, str(task_id))
        for ad, task_id in zip(ads, tasks, strict=True)
    ]
    response = client.post("/", headers=BATCH, json=events)
    assert response.status_code == 200
    assert [result["outcome"] for result in response.json()["results"]] == ["retried"] * 3
    retries = kafka_topics.read(kafka_topics.retry, expect=3)
    assert sorted(orjson.loads(r.value())["task_id"] for r in retries) == sorted(tasks)
    assert all(orjson.loads(r.value())["retry_count"] == 1 for r in retries)
    disposable_postgres.start()
    assert {task_row(disposable_postgres.url, t)["status"] for t in tasks} == {"pending"}


def test_consumer_batch_answers_5xx_per_event_when_its_outcome_is_not_durable(
    stranded: tuple[TestClient, dict],
) -> None:
    client, record = stranded
    events = [batch_event(record, "only")]
    response = client.post("/", headers=BATCH, json=events)
    assert response.status_code == 200
    assert response.json()["results"] == [
        {"id": "only", "status": 503, "detail": "Message broker is not available"}
    ]


@pytest.mark.parametrize("body", [b"not json", b'{"id": "an object"}', b"[1"])
def test_consumer_batch_that_is_no_json_array_is_refused_with_400(make_client, body) -> None:
    response = make_client("moderation_consumer").post("/", headers=BATCH, content=body)
    assert response.status_code == 400
    assert "batch" in response.json()["detail"]


def test_consumer_batch_element_with_bad_base64_is_refused_alone(
    make_client, database_url: str
) -> None:
    ad = insert_ad(database_url)
    task_id = insert_task(database_url, ad["item_id"])
    events = [
        {**batch_event({}, "bad"), "data_base64": "***"},
        batch_event({"item_id": ad["item_id"], "task_id": task_id}, "good"),
    ]
    response = make_client("moderation_consumer").post("/", headers=BATCH, json=events)
    assert [result["status"] for result in response.json()["results"]] == [400, 200]
    assert task_row(database_url, task_id)["status"] == "completed"


def test_consumer_batch_that_cannot_be_scored_together_scores_each_event_alone(
    make_client, database_url: str, kafka_topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.errors import ScoringFailed
    from shared.model import Model

    def fails(self: Model, ads: object) -> None:
        raise ScoringFailed()  # onnxruntime failing on one row of the batch

    ads = [insert_ad(database_url) for _ in range(3)]
    tasks = [insert_task(database_url, ad["item_id"]) for ad in ads]
    client = make_client("moderation_consumer")
    monkeypatch.setattr(Model, "score", fails)  # one ad alone goes the linear way
    events = [
        batch_event({"item_id": ad["item_id"], "task_id": task_id}, str(task_id))
        for ad, task_id in zip(ads, tasks, strict=True)
    ]
    response = client.post("/", headers=BATCH, json=events)
    assert [result["outcome"] for result in response.json()["results"]] == ["completed"] * 3
    assert {task_row(database_url, t)["status"] for t in tasks} == {"completed"}
    assert kafka_topics.read(kafka_topics.dlq) == []
