"""async_predict and get_result through functions-framework's apps, real PostgreSQL and broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson
import psycopg
import pytest
from starlette.testclient import TestClient

from moderation import relay
from shared import db, tasks
from shared.config import get_settings
from tests.conftest import Topics, insert_ad
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

RESULT_KEYS = {
    "task_id", "item_id", "status", "is_violation", "probability", "error_message", "error",
    "created_at", "processed_at", "model_version",
}  # fmt: skip


@pytest.fixture
def accept(
    database_url: str,
    kafka_topics: Topics,
    make_client: Callable[[str], TestClient],
    monkeypatch: pytest.MonkeyPatch,
) -> TestClient:
    # A new idempotent producer's first delivery takes ~0.5 s on the embedded broker, more on
    # a busy machine: wait long enough that "published right after commit" is what is tested.
    monkeypatch.setenv("PUBLISH_WAIT_SECONDS", "10")
    get_settings.cache_clear()
    return make_client("async_predict")


def relay_pass() -> dict[str, int]:
    """One pass of the outbox relay, as `moderation relay --once` runs it."""

    async def one_pass() -> dict[str, int]:
        try:
            return await relay.one_pass()
        finally:
            await db.close()

    return asyncio.run(one_pass())


@pytest.fixture
def results(database_url: str, make_client: Callable[[str], TestClient]) -> TestClient:
    return make_client("get_result")


def outbox_rows(database_url: str, task_id: int) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT topic, published_at IS NOT NULL FROM outbox WHERE task_id = %s", (task_id,)
        ).fetchall()


@pytest.mark.parametrize("style", ["query", "json"])
def test_async_predict_accepts_stored_item_and_publishes_one_seed_format_record(
    accept: TestClient, results: TestClient, database_url: str, kafka_topics: Topics, style: str
) -> None:
    ad = insert_ad(database_url)
    if style == "query":
        response = accept.post("/moderation/async_predict", params={"item_id": ad["item_id"]})
    else:
        response = accept.post("/async_predict", json={"item_id": ad["item_id"]})
    assert response.status_code == 200
    body = response.json()
    assert body == {
        "task_id": body["task_id"],
        "status": "pending",
        "message": "Moderation request accepted",
    }
    task_id = body["task_id"]
    # Published after the answer, and marked so within moments.
    published = [(kafka_topics.moderation, True)]
    wait_for(lambda: outbox_rows(database_url, task_id) == published or None, 10, "marked")

    (record,) = kafka_topics.read(kafka_topics.moderation, expect=1)
    value = orjson.loads(record.value())
    # What was published is what the outbox holds (the relay would send the row itself).
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT payload, headers FROM outbox WHERE task_id = %s", (task_id,)
        ).fetchone()
    assert stored is not None
    assert value == stored[0]
    assert {k: v.decode() for k, v in record.headers()} == stored[1]
    assert set(value) == {"item_id", "task_id", "timestamp", "retry_count"}
    assert (value["item_id"], value["task_id"], value["retry_count"]) == (ad["item_id"], task_id, 0)
    assert record.key() == str(ad["item_id"]).encode()
    headers = {k: v.decode() for k, v in record.headers()}
    assert headers["ce_id"] == str(task_id)
    assert headers["ce_specversion"] == "1.0"
    assert headers["ce_type"] == "ad.moderation.requested"

    pending = results.get(f"/moderation_result/{task_id}")
    assert pending.status_code == 200
    assert set(pending.json()) == RESULT_KEYS
    assert pending.json()["status"] == "pending"
    for key in ("is_violation", "probability", "error_message", "error", "processed_at"):
        assert pending.json()[key] is None


def test_async_predict_unknown_item_is_404_and_creates_nothing(
    accept: TestClient, kafka_topics: Topics
) -> None:
    response = accept.post("/async_predict", params={"item_id": 2_000_000_002})
    assert response.status_code == 404
    assert "not found" in response.json()["detail"]
    assert kafka_topics.read(kafka_topics.moderation) == []


@pytest.mark.parametrize("params", [{"item_id": 0}, {"item_id": -1}, {"item_id": "x"}, {}])
def test_async_predict_invalid_item_id_is_422(accept: TestClient, params: dict) -> None:
    assert accept.post("/async_predict", params=params).status_code == 422


def test_async_predict_same_idempotency_key_gives_the_same_task(
    accept: TestClient, database_url: str, kafka_topics: Topics
) -> None:
    ad = insert_ad(database_url)
    key = {"Idempotency-Key": f"order-{ad['item_id']}"}
    first = accept.post("/async_predict", params={"item_id": ad["item_id"]}, headers=key)
    again = accept.post("/async_predict", params={"item_id": ad["item_id"]}, headers=key)
    other = accept.post("/async_predict", params={"item_id": ad["item_id"]}).json()
    assert first.json() == {
        "task_id": first.json()["task_id"], "status": "pending",
        "message": "Moderation request accepted",
    }  # fmt: skip
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["task_id"] == first.json()["task_id"]
    assert again.json()["replay"] is True
    assert other["task_id"] != first.json()["task_id"]
    assert len(kafka_topics.read(kafka_topics.moderation, expect=2)) == 2  # no record for a replay


def test_async_predict_replay_of_a_finished_task_answers_its_result(
    accept: TestClient, database_url: str
) -> None:
    ad = insert_ad(database_url)
    key = {"Idempotency-Key": f"done-{ad['item_id']}"}
    task_id = accept.post("/async_predict", params={"item_id": ad["item_id"]}, headers=key).json()[
        "task_id"
    ]
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE moderation_results SET status = 'completed', is_violation = true,"
            " probability = 0.9, processed_at = now() WHERE id = %s",
            (task_id,),
        )
    replay = accept.post("/async_predict", params={"item_id": ad["item_id"]}, headers=key).json()
    assert replay["task_id"] == task_id
    assert (replay["status"], replay["is_violation"], replay["probability"]) == (
        "completed", True, 0.9,
    )  # fmt: skip


def test_async_predict_broker_down_still_accepts_and_relay_publishes_later(
    database_url: str,
    kafka_topics: Topics,
    make_client: Callable[[str], TestClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ad = insert_ad(database_url)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("PUBLISH_WAIT_SECONDS", "0.5")
    get_settings.cache_clear()
    response = make_client("async_predict").post(
        "/async_predict", params={"item_id": ad["item_id"]}
    )
    assert response.status_code == 200
    task_id = response.json()["task_id"]
    # The publish after the answer gives up (0.5 s): the row stays for the relay, unmarked.
    wait_for(lambda: not tasks._running or None, 10, "the publish after commit to give up")
    time.sleep(2 * tasks._PublishedMarks.LINGER_SECONDS)
    assert outbox_rows(database_url, task_id) == [(kafka_topics.moderation, False)]

    # The broker is reachable again: the relay publishes what the request could not.
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_topics.bootstrap_servers)
    monkeypatch.setenv("RELAY_GRACE_SECONDS", "0")
    get_settings.cache_clear()
    published = relay_pass()["published"]
    assert published >= 1
    assert outbox_rows(database_url, task_id) == [(kafka_topics.moderation, True)]
    records = kafka_topics.read(kafka_topics.moderation, expect=1)
    assert [orjson.loads(r.value())["task_id"] for r in records] == [task_id]


def task_with_outbox(
    database_url: str,
    topic: str,
    item_id: int,
    *,
    status: str = "pending",
    age_seconds: float = 0,
    published_seconds_ago: float | None = None,
    publish_count: int = 0,
) -> int:
    """A task and its outbox row as the database would hold them, made directly."""
    payload = orjson.dumps({"item_id": item_id}).decode()
    with psycopg.connect(database_url) as conn:
        (task_id,) = conn.execute(
            "INSERT INTO moderation_results (item_id, status, created_at, processed_at)"
            " VALUES (%s, %s, now() - make_interval(secs => %s),"
            "  CASE WHEN %s = 'pending' THEN NULL ELSE now() END) RETURNING id",
            (item_id, status, age_seconds, status),
        ).fetchone()  # type: ignore[misc]
        conn.execute(
            "INSERT INTO outbox (task_id, topic, key, payload, created_at, published_at,"
            " publish_count) VALUES (%s, %s, %s, jsonb_set(%s::jsonb, '{task_id}', to_jsonb(%s)),"
            " now() - make_interval(secs => %s),"
            " now() - make_interval(secs => %s::float8), %s)",
            (task_id, topic, str(item_id), payload, task_id, age_seconds,
             published_seconds_ago, publish_count),
        )  # fmt: skip
    return int(task_id)


def test_relay_leaves_fresh_rows_to_the_publish_after_commit(
    database_url: str, kafka_topics: Topics, make_client: Callable[[str], TestClient]
) -> None:
    """A crash between commit and publish leaves a row the relay picks up once it is due."""
    ad = insert_ad(database_url)
    # What a crashed request leaves behind: committed, never published.
    task_id = task_with_outbox(database_url, kafka_topics.moderation, ad["item_id"])
    client = make_client("async_predict")
    client.portal.call(tasks.relay_once, 3600.0)  # type: ignore[union-attr]
    assert outbox_rows(database_url, task_id) == [(kafka_topics.moderation, False)]
    client.portal.call(tasks.relay_once, 0.0)  # type: ignore[union-attr]
    assert outbox_rows(database_url, task_id) == [(kafka_topics.moderation, True)]
    (record,) = kafka_topics.read(kafka_topics.moderation, expect=1)
    assert orjson.loads(record.value())["task_id"] == task_id


def test_async_predict_database_down_is_503(
    make_client: Callable[[str], TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("DATABASE_TIMEOUT", "1")
    get_settings.cache_clear()
    response = make_client("async_predict").post("/async_predict", params={"item_id": 1})
    assert response.status_code == 503
    assert response.json() == {"detail": "Database is not available"}
    assert "nobody" not in response.text


def test_get_result_unknown_task_is_404(results: TestClient) -> None:
    response = results.get("/moderation_result/999999999")
    assert response.status_code == 404
    assert response.json() == {"detail": "Task not found"}


@pytest.mark.parametrize("task_id", ["0", "-1", "abc", "1.5", "9223372036854775808"])
def test_get_result_invalid_task_id_is_422(results: TestClient, task_id: str) -> None:
    assert results.get(f"/moderation/moderation_result/{task_id}").status_code == 422


def test_get_result_wrong_method_is_405(results: TestClient) -> None:
    assert results.post("/moderation_result/1").status_code == 405


def test_relay_publishes_again_a_task_pending_long_after_its_record_was_published(
    database_url: str,
    kafka_topics: Topics,
    make_client: Callable[[str], TestClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A record lost after publishing (a broker that forgot it) does not strand its task."""
    ad = insert_ad(database_url)
    stale, _done = (
        task_with_outbox(database_url, kafka_topics.moderation, ad["item_id"], status=status,
                         age_seconds=3600, published_seconds_ago=3600, publish_count=1)
        for status in ("pending", "completed")
    )  # fmt: skip
    monkeypatch.setenv("STALE_TASK_SECONDS", "60")
    monkeypatch.setenv("RELAY_GRACE_SECONDS", "0")
    get_settings.cache_clear()
    body = relay_pass()
    assert body["requeued"] >= 1  # other tests' stale tasks may be requeued too
    assert body["published"] >= 1
    records = kafka_topics.read(kafka_topics.moderation, expect=1)
    assert [orjson.loads(r.value())["task_id"] for r in records] == [stale]  # never `done`


def test_async_predict_idempotency_key_of_another_item_is_422(
    accept: TestClient, database_url: str
) -> None:
    first, second = insert_ad(database_url), insert_ad(database_url)
    key = {"Idempotency-Key": f"shared-{first['item_id']}"}
    assert (
        accept.post("/async_predict", params={"item_id": first["item_id"]}, headers=key).status_code
        == 200
    )
    response = accept.post("/async_predict", params={"item_id": second["item_id"]}, headers=key)
    assert response.status_code == 422
    assert "another item" in response.json()["detail"]


@pytest.mark.parametrize("key", ["k" * 256, "tab\tkey", "ключ", "del\x7fkey"])
def test_async_predict_bad_idempotency_key_is_422(
    accept: TestClient, database_url: str, key: str
) -> None:
    ad = insert_ad(database_url)
    headers = {"Idempotency-Key": key.encode("utf-8")}  # as bytes: any octets on the wire
    response = accept.post("/async_predict", params={"item_id": ad["item_id"]}, headers=headers)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]


def test_relay_requeue_backs_off_with_every_publish(
    database_url: str,
    kafka_topics: Topics,
    make_client: Callable[[str], TestClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ad = insert_ad(database_url)
    # Published three times already, the last 90 s ago: due again only after 4 x 60 s.
    task_id = task_with_outbox(
        database_url,
        kafka_topics.moderation,
        ad["item_id"],
        age_seconds=3600,
        published_seconds_ago=90,
        publish_count=3,
    )
    monkeypatch.setenv("STALE_TASK_SECONDS", "60")
    get_settings.cache_clear()
    relay_pass()
    assert outbox_rows(database_url, task_id) == [(kafka_topics.moderation, True)]


def test_relay_prunes_old_published_rows_of_finished_tasks_only(
    database_url: str,
    kafka_topics: Topics,
    make_client: Callable[[str], TestClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ad = insert_ad(database_url)
    rows = {
        name: task_with_outbox(database_url, kafka_topics.moderation, ad["item_id"],
                               status=status, published_seconds_ago=published, publish_count=1)
        for name, status, published in [
            ("old_done", "completed", 7200),
            ("new_done", "completed", 0),
            ("old_pending", "pending", 7200),
        ]
    }  # fmt: skip
    monkeypatch.setenv("OUTBOX_RETENTION_SECONDS", "3600")
    monkeypatch.setenv("STALE_TASK_SECONDS", "86400")
    get_settings.cache_clear()
    assert relay_pass()["pruned"] >= 1
    assert outbox_rows(database_url, rows["old_done"]) == []
    assert outbox_rows(database_url, rows["new_done"]) == [(kafka_topics.moderation, True)]
    assert outbox_rows(database_url, rows["old_pending"]) == [(kafka_topics.moderation, True)]


@pytest.mark.parametrize("path", ["/outbox/relay", "/moderation/outbox/relay"])
def test_async_predict_serves_no_internal_relay_endpoint(accept: TestClient, path: str) -> None:
    assert accept.post(path).status_code == 404


def test_async_predict_request_id_is_answered_and_travels_in_the_record(
    accept: TestClient, database_url: str, kafka_topics: Topics
) -> None:
    ad = insert_ad(database_url)
    response = accept.post(
        "/async_predict", params={"item_id": ad["item_id"]}, headers={"X-Request-ID": "req-42"}
    )
    assert response.headers["x-request-id"] == "req-42"
    (record,) = kafka_topics.read(kafka_topics.moderation, expect=1)
    assert dict(record.headers())["ce_requestid"] == b"req-42"


def test_an_ad_stored_while_the_accept_ran_is_accepted_on_the_second_try(
    accept: TestClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-statement accept makes nothing when it does not see the ad; if the ad is there
    when the reason is looked up, it is accepted once more, not refused."""
    from shared import repository

    ad = insert_ad(database_url)
    real = repository.accept_tasks
    calls: list[int] = []

    async def missed_once(*args: object, **kwargs: object) -> dict[int, tuple[int, int]]:
        calls.append(1)
        return {} if len(calls) == 1 else await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(repository, "accept_tasks", missed_once)
    response = accept.post("/async_predict", params={"item_id": ad["item_id"]})
    assert response.status_code == 200 and len(calls) == 2
    assert outbox_rows(database_url, response.json()["task_id"])  # with its outbox row


def test_accepts_arriving_together_go_in_one_statement_each_with_its_own_task_and_record(
    database_url: str, kafka_topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from shared import db, logs, repository, tasks
    from shared.errors import ItemNotFound

    get_settings.cache_clear()
    ads = [insert_ad(database_url)["item_id"] for _ in range(3)]
    asked = [ads[n % 3] for n in range(30)] + [2_000_000_000]  # the last one: no such ad
    real = repository.accept_tasks
    groups: list[int] = []

    async def counted(conn, *, topic, requests):  # type: ignore[no-untyped-def]
        groups.append(len(requests))
        return await real(conn, topic=topic, requests=requests)

    monkeypatch.setattr(repository, "accept_tasks", counted)
    monkeypatch.setattr(tasks._Accepts, "MAX_GROUP", 7)  # several groups

    async def one(number: int, item_id: int) -> int | str:
        logs.request_id.set(f"request-{number}")
        try:
            return (await tasks.accept(item_id)).task_id
        except ItemNotFound:
            return "404"

    async def all_at_once() -> list[int | str]:
        try:
            return await asyncio.gather(*(one(n, item) for n, item in enumerate(asked)))
        finally:
            await db.close()

    answers = asyncio.run(all_at_once())
    assert answers[-1] == "404"
    task_ids = answers[:-1]
    assert len(set(task_ids)) == 30
    assert groups == [7, 7, 7, 7, 3]  # together, not one statement each
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT t.id, t.item_id, o.payload, o.headers FROM moderation_results t"
            " JOIN outbox o ON o.task_id = t.id WHERE t.id = ANY(%s)",
            (task_ids,),
        ).fetchall()
    assert len(rows) == 30  # one outbox row each
    by_task = {row[0]: row for row in rows}
    for number, (task_id, item_id) in enumerate(zip(task_ids, asked, strict=False)):
        _, stored_item, payload, headers = by_task[task_id]
        assert stored_item == item_id
        assert (payload["task_id"], payload["item_id"]) == (task_id, item_id)
        assert headers["ce_id"] == str(task_id)
        assert headers["ce_requestid"] == f"request-{number}"  # its own request's id


def test_accepts_of_a_group_whose_statement_fails_each_answer_503_and_the_next_group_goes_on(
    database_url: str, kafka_topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from shared import db, repository, tasks
    from shared.errors import DatabaseUnavailable

    get_settings.cache_clear()
    item_id = insert_ad(database_url)["item_id"]
    real = repository.accept_tasks
    calls: list[int] = []

    async def first_fails(conn, *, topic, requests):  # type: ignore[no-untyped-def]
        calls.append(len(requests))
        if len(calls) == 1:
            raise DatabaseUnavailable()
        return await real(conn, topic=topic, requests=requests)

    monkeypatch.setattr(repository, "accept_tasks", first_fails)
    monkeypatch.setattr(tasks._Accepts, "MAX_GROUP", 3)

    async def one() -> int | str:
        try:
            return (await tasks.accept(item_id)).task_id
        except DatabaseUnavailable as error:
            return str(error)

    async def all_at_once() -> list[int | str]:
        try:
            return await asyncio.gather(*(one() for _ in range(5)))
        finally:
            await db.close()

    answers = asyncio.run(all_at_once())
    assert answers[:3] == ["Database is not available"] * 3
    assert all(isinstance(answer, int) for answer in answers[3:])
    assert calls == [3, 2]


def test_accepts_waiting_longer_than_the_database_timeout_answer_503(
    database_url: str, kafka_topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from shared import db, repository, tasks
    from shared.errors import DatabaseUnavailable

    monkeypatch.setenv("DATABASE_TIMEOUT", "0.5")
    get_settings.cache_clear()
    item_id = insert_ad(database_url)["item_id"]
    real = repository.accept_tasks
    released: list[asyncio.Event] = []

    async def hangs(conn, *, topic, requests):  # type: ignore[no-untyped-def]
        await released[0].wait()  # a statement that does not end by itself
        return await real(conn, topic=topic, requests=requests)

    monkeypatch.setattr(repository, "accept_tasks", hangs)

    async def run() -> tuple[str, bool]:
        released.append(asyncio.Event())
        try:
            # (wait_for only so that a broken timeout fails the test instead of hanging it)
            await asyncio.wait_for(tasks.accept(item_id), 30)
            answered = "accepted"
        except DatabaseUnavailable as error:
            answered = str(error)
        still_hanging = not released[0].is_set()
        released[0].set()
        await db.close()
        return answered, still_hanging

    answered, still_hanging = asyncio.run(run())
    assert answered == "Database is not available"
    assert still_hanging  # answered at the timeout, while the statement was still under way
