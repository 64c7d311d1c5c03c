"""SQL, in one place. Values only ever travel as placeholders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from shared.schemas import Ad

if TYPE_CHECKING:
    import psycopg

_AD_BY_ID = """
    SELECT a.id AS item_id, a.seller_id, u.is_verified_seller, a.name, a.description,
           a.category, a.images_qty
    FROM advertisements a JOIN users u ON u.id = a.seller_id
    WHERE a.id = %s
"""


async def get_ad(conn: psycopg.AsyncConnection[Any], item_id: int) -> Ad | None:
    cursor = await conn.execute(_AD_BY_ID, (item_id,))
    row = await cursor.fetchone()
    return None if row is None else Ad.model_validate(row)


_TASKS_AND_ADS = """
    SELECT t.id AS task_id, t.item_id, t.status, t.created_at, u.id AS seller_found,
           a.seller_id, u.is_verified_seller, a.name, a.description, a.category, a.images_qty
    FROM moderation_results t
    LEFT JOIN advertisements a ON a.id = t.item_id
    LEFT JOIN users u ON u.id = a.seller_id
    WHERE t.id = ANY(%s)
"""

TaskAndAd = tuple[dict[str, Any], Ad | None]


async def get_task_and_ad(
    conn: psycopg.AsyncConnection[Any], task_id: int
) -> tuple[dict[str, Any] | None, Ad | None]:
    """A task (task_id, item_id, status, created_at) and the ad it is about, in one query:
    (None, None) without the task, (task, None) when its ad (or the ad's seller) is gone."""
    found = await get_tasks_and_ads(conn, [task_id])
    return found.get(task_id, (None, None))


async def get_tasks_and_ads(
    conn: psycopg.AsyncConnection[Any], task_ids: Sequence[int]
) -> dict[int, TaskAndAd]:
    """get_task_and_ad for several tasks in one query, by task id (missing tasks left out)."""
    cursor = await conn.execute(_TASKS_AND_ADS, (list(task_ids),))
    found: dict[int, TaskAndAd] = {}
    for row in await cursor.fetchall():
        task = {key: row[key] for key in ("task_id", "item_id", "status", "created_at")}
        # Without the seller, as an inner join of ad and seller would find nothing.
        ad = None if row["seller_found"] is None else Ad.model_validate(row)
        found[row["task_id"]] = (task, ad)
    return found


async def ad_exists(conn: psycopg.AsyncConnection[Any], item_id: int) -> bool:
    cursor = await conn.execute("SELECT 1 FROM advertisements WHERE id = %s", (item_id,))
    return await cursor.fetchone() is not None


_GET_TASK = """
SELECT id AS task_id, item_id, status, is_violation, probability, error_message,
    error_message AS error, created_at, processed_at, model_version, attempts
FROM moderation_results WHERE id = %s
"""


_GET_TASK_BY_KEY = _GET_TASK.replace("WHERE id = %s", "WHERE idempotency_key = %s")


async def get_task_by_key(
    conn: psycopg.AsyncConnection[Any], idempotency_key: str
) -> dict[str, Any] | None:
    cursor = await conn.execute(_GET_TASK_BY_KEY, (idempotency_key,))
    return await cursor.fetchone()


async def insert_task(conn: psycopg.AsyncConnection[Any], item_id: int) -> int:
    """A new pending task for an item, with no outbox row (a seed-format record's own task)."""
    cursor = await conn.execute(
        "INSERT INTO moderation_results (item_id) VALUES (%s) RETURNING id", (item_id,)
    )
    row = await cursor.fetchone()
    assert row is not None
    return int(row["id"])


async def get_task(conn: psycopg.AsyncConnection[Any], task_id: int) -> dict[str, Any] | None:
    cursor = await conn.execute(_GET_TASK, (task_id,))
    return await cursor.fetchone()


async def oldest_pending_task(conn: psycopg.AsyncConnection[Any], item_id: int) -> int | None:
    cursor = await conn.execute(
        "SELECT id FROM moderation_results WHERE item_id = %s AND status = 'pending'"
        " ORDER BY id LIMIT 1",
        (item_id,),
    )
    row = await cursor.fetchone()
    return None if row is None else int(row["id"])


async def complete_task(
    conn: psycopg.AsyncConnection[Any],
    task_id: int,
    *,
    is_violation: bool,
    probability: float,
    model_version: str,
    attempts: int,
) -> bool:
    """Record a result; only a pending task changes, so a duplicate delivery changes nothing."""
    cursor = await conn.execute(
        "UPDATE moderation_results SET status = 'completed', is_violation = %s, probability = %s,"
        " model_version = %s, attempts = %s, processed_at = now()"
        " WHERE id = %s AND status = 'pending'",
        (is_violation, probability, model_version, attempts, task_id),
    )
    return cursor.rowcount == 1


async def complete_tasks(
    conn: psycopg.AsyncConnection[Any],
    results: Sequence[tuple[int, bool, float, int]],
    *,
    model_version: str,
) -> set[int]:
    """complete_task for many (task_id, is_violation, probability, attempts) in one statement;
    returns the ids it changed (the pending ones)."""
    if not results:
        return set()
    ids, violations, probabilities, attempts = (list(col) for col in zip(*results, strict=True))
    cursor = await conn.execute(
        "UPDATE moderation_results t SET status = 'completed', is_violation = r.is_violation,"
        " probability = r.probability, model_version = %s, attempts = r.attempts,"
        " processed_at = now()"
        " FROM unnest(%s::bigint[], %s::boolean[], %s::float8[], %s::int[])"
        "   AS r(id, is_violation, probability, attempts)"
        " WHERE t.id = r.id AND t.status = 'pending' RETURNING t.id",
        (model_version, ids, violations, probabilities, attempts),
    )
    return {row["id"] for row in await cursor.fetchall()}


async def fail_task(
    conn: psycopg.AsyncConnection[Any], task_id: int, *, error_message: str, attempts: int
) -> bool:
    cursor = await conn.execute(
        "UPDATE moderation_results SET status = 'failed', error_message = %s, attempts = %s,"
        " processed_at = now() WHERE id = %s AND status = 'pending'",
        (error_message, attempts, task_id),
    )
    return cursor.rowcount == 1


_ACCEPT = """
WITH task AS (
    INSERT INTO moderation_results (item_id, idempotency_key)
    SELECT %(item_id)s, %(idempotency_key)s
    WHERE EXISTS (SELECT 1 FROM advertisements WHERE id = %(item_id)s)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id
)
INSERT INTO outbox (task_id, topic, key, payload, headers)
SELECT id, %(topic)s, %(key)s,
    jsonb_set(%(payload)s, '{task_id}', to_jsonb(id)),
    jsonb_set(%(headers)s, '{ce_id}', to_jsonb(id::text))
FROM task
RETURNING id, task_id
"""


async def accept_task(
    conn: psycopg.AsyncConnection[Any],
    *,
    item_id: int,
    idempotency_key: str | None,
    topic: str,
    key: str,
    payload: dict[str, Any],
    headers: dict[str, str],
) -> tuple[int, int] | None:
    """A new pending task and its outbox row in one statement (one round trip, atomic on its
    own): (task id, outbox id). The task id goes into the payload's `task_id` and the headers'
    `ce_id`. None when it made nothing: the ad does not exist, or the idempotency key is taken.
    """
    from psycopg.types.json import Jsonb

    cursor = await conn.execute(
        _ACCEPT,
        {
            "item_id": item_id, "idempotency_key": idempotency_key, "topic": topic, "key": key,
            "payload": Jsonb(payload), "headers": Jsonb(headers),
        },
    )  # fmt: skip
    row = await cursor.fetchone()
    return None if row is None else (int(row["task_id"]), int(row["id"]))


# The task ids are drawn first (the id column is GENERATED BY DEFAULT, so they may be given),
# so that each request's task and outbox row are found by its place in the input.
_ACCEPT_MANY = """
WITH input AS (
    SELECT nextval(pg_get_serial_sequence('moderation_results', 'id')) AS id, i.*
    FROM unnest(%(items)s::int[], %(payloads)s::jsonb[], %(headers)s::jsonb[])
        WITH ORDINALITY AS i(item_id, payload, headers, n)
    WHERE EXISTS (SELECT 1 FROM advertisements a WHERE a.id = i.item_id)
), task AS (
    INSERT INTO moderation_results (id, item_id) SELECT id, item_id FROM input
), outbox AS (
    INSERT INTO outbox (task_id, topic, key, payload, headers)
    SELECT id, %(topic)s, item_id::text,
        jsonb_set(payload, '{task_id}', to_jsonb(id)),
        jsonb_set(headers, '{ce_id}', to_jsonb(id::text))
    FROM input
    RETURNING id, task_id
)
SELECT input.n, outbox.task_id, outbox.id FROM input JOIN outbox ON outbox.task_id = input.id
"""


async def accept_tasks(
    conn: psycopg.AsyncConnection[Any],
    *,
    topic: str,
    requests: Sequence[tuple[int, dict[str, Any], dict[str, str]]],
) -> dict[int, tuple[int, int]]:
    """accept_task for several (item_id, payload, headers) without an idempotency key, in one
    statement: (task id, outbox id) by the request's index; an index left out has no ad."""
    from psycopg.types.json import Jsonb

    items, payloads, headers = zip(*requests, strict=True)
    cursor = await conn.execute(
        _ACCEPT_MANY,
        {
            "items": list(items), "payloads": [Jsonb(p) for p in payloads],
            "headers": [Jsonb(h) for h in headers], "topic": topic,
        },
    )  # fmt: skip
    return {
        int(row["n"]) - 1: (int(row["task_id"]), int(row["id"])) for row in await cursor.fetchall()
    }


async def lock_unpublished(
    conn: psycopg.AsyncConnection[Any], *, limit: int, older_than_seconds: float
) -> list[dict[str, Any]]:
    """Unpublished outbox rows, locked so that several relays never publish the same row."""
    cursor = await conn.execute(
        "SELECT id, task_id, topic, key, payload, headers FROM outbox"
        " WHERE published_at IS NULL AND created_at <= now() - make_interval(secs => %s)"
        " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
        (older_than_seconds, limit),
    )
    return await cursor.fetchall()


async def outbox_backlog(conn: psycopg.AsyncConnection[Any]) -> tuple[int, float]:
    """How many outbox rows wait to be published, and the age in seconds of the oldest."""
    cursor = await conn.execute(
        "SELECT count(*) AS rows, coalesce(extract(epoch FROM now() - min(created_at)), 0) AS age"
        " FROM outbox WHERE published_at IS NULL"
    )
    row = await cursor.fetchone()
    assert row is not None
    return int(row["rows"]), float(row["age"])


async def mark_published(conn: psycopg.AsyncConnection[Any], outbox_ids: list[int]) -> None:
    if outbox_ids:
        await conn.execute(
            "UPDATE outbox SET published_at = now(), publish_count = publish_count + 1"
            " WHERE id = ANY(%s) AND published_at IS NULL",
            (outbox_ids,),
        )


async def requeue_stale_outbox(
    conn: psycopg.AsyncConnection[Any], *, older_than_seconds: float
) -> int:
    """Mark unpublished again the outbox rows of tasks still pending long after publishing.

    "Long" doubles with every publish of the row (at most 2^10 times the base age), so a
    consumer that is merely slow or down does not get the backlog sent again and again.
    """
    cursor = await conn.execute(
        "UPDATE outbox SET published_at = NULL"
        " WHERE published_at < now()"
        "   - make_interval(secs => %s * power(2, least(greatest(publish_count - 1, 0), 10)))"
        " AND task_id IN (SELECT id FROM moderation_results"
        "   WHERE status = 'pending' AND created_at < now() - make_interval(secs => %s))",
        (older_than_seconds, older_than_seconds),
    )
    return cursor.rowcount


async def prune_outbox(conn: psycopg.AsyncConnection[Any], *, older_than_seconds: float) -> int:
    """Delete published outbox rows of finished tasks older than the given age."""
    cursor = await conn.execute(
        "DELETE FROM outbox o USING moderation_results t"
        " WHERE t.id = o.task_id AND t.status <> 'pending'"
        " AND o.published_at < now() - make_interval(secs => %s)",
        (older_than_seconds,),
    )
    return cursor.rowcount
