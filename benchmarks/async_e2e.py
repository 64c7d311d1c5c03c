"""Asynchronous moderation end to end through the dev stack: tasks/s and accept -> completed
latency (created_at -> processed_at, both written by PostgreSQL's clock).

    python -m benchmarks.async_e2e [--tasks 2000] [--concurrency 16]

Honours DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS like `moderation dev`; embedded otherwise.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import click
import httpx
import psycopg

from moderation.dev.ports import free_port
from moderation.dev.stack import DevStack
from shared.config import get_settings


async def accept_all(base: str, item_ids: list[int], concurrency: int) -> list[int]:
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def accept(item_id: int) -> int:
            async with semaphore:
                response = await client.post("/async_predict", params={"item_id": item_id})
                response.raise_for_status()
                return int(response.json()["task_id"])

        return await asyncio.gather(*(accept(item_id) for item_id in item_ids))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@click.command()
@click.option("--tasks", default=2000, show_default=True)
@click.option("--concurrency", default=16, show_default=True)
@click.option(
    "--direct",
    is_flag=True,
    help="Post to async_predict itself, not through the dev gateway (a Python proxy).",
)
def main(tasks: int, concurrency: int, direct: bool) -> None:
    settings = get_settings()
    stack = DevStack(
        port=free_port(),
        database_url=settings.database_url,
        kafka_bootstrap_servers=settings.kafka_bootstrap_servers,
        quiet=True,
    )
    stack.start()
    try:
        assert stack.database_url
        demo_items = [1, 2, 3, 100]
        items = [demo_items[i % len(demo_items)] for i in range(tasks)]
        started = time.perf_counter()
        base = stack.urls["async_predict" if direct else "gateway"]
        task_ids = asyncio.run(accept_all(base, items, concurrency))
        accepted = time.perf_counter() - started
        with psycopg.connect(stack.database_url) as conn:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT count(*) FROM moderation_results"
                    " WHERE id = ANY(%s) AND status <> 'pending'",
                    (task_ids,),
                ).fetchone()
                if row and row[0] == len(task_ids):
                    break
                time.sleep(0.1)
            finished = time.perf_counter() - started
            rows = conn.execute(
                "SELECT status, extract(epoch FROM processed_at - created_at),"
                " extract(epoch FROM max(processed_at) OVER () - min(created_at) OVER ())"
                " FROM moderation_results WHERE id = ANY(%s)",
                (task_ids,),
            ).fetchall()
    finally:
        stack.stop()
    latencies = [float(r[1]) * 1000 for r in rows if r[1] is not None]
    statuses = {status: sum(1 for r in rows if r[0] == status) for status, *_ in rows}
    span = float(rows[0][2])
    via = "straight to async_predict" if direct else "via the dev gateway"
    print(f"async end to end: {tasks} tasks, {concurrency} concurrent clients, {via}")
    print(f"  statuses            {statuses}")
    print(f"  accept rate         {tasks / accepted:8.1f} requests/s ({accepted:.2f} s)")
    print(f"  end-to-end          {tasks / span:8.1f} tasks/s (first accept -> last completed)")
    print(f"  wall clock          {finished:8.2f} s until all finished (client view)")
    print(
        f"  accept -> completed p50 {statistics.median(latencies):.1f} ms"
        f"  p99 {percentile(latencies, 0.99):.1f} ms  max {max(latencies):.1f} ms"
    )


if __name__ == "__main__":
    main()
