"""The asynchronous path under open-loop load: tasks offered at fixed rates, step by step,
through the dev stack (everything on this machine), until it saturates.

    python -m benchmarks.async_load [--rates 50,100,200,500,1000,1500,2000] [--seconds 10]
                                    [--direct] [--out docs/benchmarks]

Open loop: each step sends `rate` accepts a second on a fixed schedule, whether or not earlier
ones were answered, and counts latency from the scheduled time (a slow answer delays nothing
else, and queueing shows). Accepts go to the dev gateway (`--direct`: to `async_predict` itself).
After each step it waits until every accepted task is finished and reads from PostgreSQL the
accept → completed time (`created_at` → `processed_at`, both the database's clock).

Per step: offered and achieved rates, accept p50/p99, accept → completed p50/p95/p99, failures,
and CPU seconds per task of every process (functions, adapter, relay, gateway, PostgreSQL, the
broker, and this load generator). It stops after the first step that saturates (completions
fall below 90 % of the offered rate, or tasks are not finished 60 s after the step). Writes
async.json, async.md and async.png. Honours DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS like
`moderation dev`; embedded servers otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import psutil
import psycopg

from benchmarks import outputs
from moderation.dev.ports import free_port
from moderation.dev.stack import REPO_ROOT, DevStack
from shared.config import get_settings

DEMO_ITEMS = (1, 2, 3, 100)  # the ads `moderation dev` seeds
DRAIN_SECONDS = 60.0
SATURATED_BELOW = 0.9  # completions per second under 90 % of the offered rate


class Connections:
    """Keep-alive HTTP/1.1 connections to one server. A request takes an idle connection or
    opens one (up to `limit`), so sending never waits for an earlier answer. A connection
    idle for over IDLE_SECONDS is closed, not reused: the server may be closing it."""

    IDLE_SECONDS = 1.0  # below gunicorn's keep-alive (2 s) and uvicorn's (5 s)

    def __init__(self, url: str, limit: int = 512) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self._slots = asyncio.Semaphore(limit)

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer, since = self._idle.pop()
            if time.monotonic() - since < self.IDLE_SECONDS:
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        async with self._slots:
            reader, writer = await self._connection()
            try:
                writer.write(
                    f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json"
                    f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
                answer = await reader.readexactly(length)
            except BaseException:
                writer.close()
                raise
            if "connection: close" in head:
                writer.close()
            else:
                self._idle.append((reader, writer, time.monotonic()))
            return int(head.split(" ", 2)[1]), answer

    def close(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()


@dataclass
class Step:
    rate: int
    seconds: float
    accept_ms: list[float] = field(default_factory=list)
    task_ids: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    sent_for: float = 0.0  # seconds from the first scheduled send to the last answer


async def offer(connections: Connections, step: Step) -> None:
    """Send step.rate accepts a second for step.seconds, on schedule."""
    loop = asyncio.get_running_loop()
    count = int(step.rate * step.seconds)
    start = loop.time() + 0.05

    async def accept(number: int, due: float) -> None:
        body = json.dumps({"item_id": DEMO_ITEMS[number % len(DEMO_ITEMS)]}).encode()
        try:
            status, answer = await connections.post("/async_predict", body)
        except (OSError, asyncio.IncompleteReadError) as error:
            step.errors[type(error).__name__] = step.errors.get(type(error).__name__, 0) + 1
            return
        step.accept_ms.append((loop.time() - due) * 1e3)
        if status == 200:
            step.task_ids.append(int(json.loads(answer)["task_id"]))
        else:
            step.errors[str(status)] = step.errors.get(str(status), 0) + 1

    pending: list[asyncio.Task[None]] = []
    number = 0
    while number < count:
        now = loop.time()
        while number < count and start + number / step.rate <= now:  # all that are due
            pending.append(asyncio.create_task(accept(number, start + number / step.rate)))
            number += 1
        if number < count:
            await asyncio.sleep(max(0.0, start + number / step.rate - loop.time()))
    await asyncio.gather(*pending)
    step.sent_for = loop.time() - start


def processes(stack: DevStack) -> dict[str, psutil.Process]:
    found = {"load generator": psutil.Process()}
    for child in stack.children:
        if child.process is not None and child.process.poll() is None:
            found[child.name] = psutil.Process(child.process.pid)
    for name, server in (("postgres", stack.postgres), ("broker", stack.kafka)):
        pid = server.pid if server is not None else None
        if pid is not None:
            found[name] = psutil.Process(pid)
    return found


def cpu_by_process(tree: dict[str, psutil.Process]) -> dict[str, float]:
    """User + system seconds of each process and its children (workers, backends); the load
    generator's own only (the stack's processes are its children)."""
    totals: dict[str, float] = {}
    for name, process in tree.items():
        total = 0.0
        family = [process] if name == "load generator" else [process, *process.children(True)]
        try:
            for each in family:
                times = each.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
        totals[name] = total
    return totals


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def finish(database_url: str, task_ids: list[int]) -> tuple[list[float], dict[str, int], float]:
    """Waits until every task is finished (or DRAIN_SECONDS pass); their accept → completed
    milliseconds, their statuses, and first accept → last completion in seconds."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        deadline = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM moderation_results WHERE id = ANY(%s) AND status = 'pending'",
                (task_ids,),
            ).fetchone()
            if row is not None and row[0] == 0:
                break
            time.sleep(0.1)
        rows = conn.execute(
            "SELECT status, extract(epoch FROM processed_at - created_at) * 1000,"
            " extract(epoch FROM max(processed_at) OVER () - min(created_at) OVER ())"
            " FROM moderation_results WHERE id = ANY(%s)",
            (task_ids,),
        ).fetchall()
    statuses: dict[str, int] = {}
    for status, *_ in rows:
        statuses[status] = statuses.get(status, 0) + 1
    latencies = [float(r[1]) for r in rows if r[0] == "completed" and r[1] is not None]
    span = float(rows[0][2]) if rows and rows[0][2] is not None else 0.0
    return latencies, statuses, span


def run_step(stack: DevStack, url: str, rate: int, seconds: float) -> dict[str, Any]:
    assert stack.database_url is not None
    tree = processes(stack)
    before = cpu_by_process(tree)
    step = Step(rate, seconds)

    async def go() -> None:
        connections = Connections(url)
        try:
            await offer(connections, step)
        finally:
            connections.close()

    asyncio.run(go())
    latencies, statuses, span = finish(stack.database_url, step.task_ids)
    after = cpu_by_process(tree)
    completed = statuses.get("completed", 0)
    cpu = {name: after[name] - before[name] for name in tree}
    tasks = max(len(step.task_ids), 1)
    result: dict[str, Any] = {
        "offered_per_s": rate,
        "accepted_per_s": len(step.task_ids) / step.sent_for if step.sent_for else 0.0,
        "completed_per_s": completed / span if span else 0.0,
        "tasks": len(step.task_ids),
        "statuses": statuses,
        "errors": step.errors,
        "accept_p50_ms": percentile(step.accept_ms, 0.50),
        "accept_p99_ms": percentile(step.accept_ms, 0.99),
        "e2e_p50_ms": percentile(latencies, 0.50),
        "e2e_p95_ms": percentile(latencies, 0.95),
        "e2e_p99_ms": percentile(latencies, 0.99),
        "cpu_ms_per_task": {name: seconds * 1e3 / tasks for name, seconds in cpu.items()},
    }
    result["cpu_ms_per_task_total"] = sum(result["cpu_ms_per_task"].values())
    unfinished = statuses.get("pending", 0)
    result["saturated"] = bool(
        unfinished or result["completed_per_s"] < SATURATED_BELOW * rate or step.errors
    )
    return result


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"`python -m benchmarks.async_load` on {report['machine']}, {report['path']}, "
        f"{report['seconds']:g} s per step, open loop.",
        "",
        "| offered/s | accepted/s | completed/s | accept p50 / p99 ms"
        " | accept → completed p50 / p95 / p99 ms | failures | CPU ms/task | top CPU per task |",
        "|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for step in report["steps"]:
        failures = {
            **step["errors"],
            **{k: v for k, v in step["statuses"].items() if k != "completed"},
        }
        top = sorted(step["cpu_ms_per_task"].items(), key=lambda item: -item[1])[:4]
        lines.append(
            f"| {step['offered_per_s']:,} | {step['accepted_per_s']:,.0f}"
            f" | {step['completed_per_s']:,.0f}"
            f" | {_ms(step['accept_p50_ms'])} / {_ms(step['accept_p99_ms'])}"
            f" | {_ms(step['e2e_p50_ms'])} / {_ms(step['e2e_p95_ms'])} / {_ms(step['e2e_p99_ms'])}"
            f" | {failures or 'none'} | {step['cpu_ms_per_task_total']:.1f}"
            f" | {', '.join(f'{name} {ms:.1f}' for name, ms in top)} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    rates = [step["offered_per_s"] for step in steps]
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(12, 4.2))
    for key, label, style in (
        ("accept_p50_ms", "accept p50", "o:"),
        ("accept_p99_ms", "accept p99", "o-"),
        ("e2e_p50_ms", "accept → completed p50", "s:"),
        ("e2e_p95_ms", "accept → completed p95", "s--"),
        ("e2e_p99_ms", "accept → completed p99", "s-"),
    ):
        points = [(rate, step[key]) for rate, step in zip(rates, steps, strict=True) if step[key]]
        if points:
            latency.plot(*zip(*points, strict=True), style, label=label)
    latency.set_xscale("log")
    latency.set_yscale("log")
    latency.set_xlabel("offered tasks/s")
    latency.set_ylabel("ms")
    latency.set_title("latency against offered rate", fontsize=10)
    latency.legend(fontsize=8)
    throughput.plot(rates, rates, "k:", label="offered")
    throughput.plot(rates, [s["accepted_per_s"] for s in steps], "o-", label="accepted/s")
    throughput.plot(rates, [s["completed_per_s"] for s in steps], "s-", label="completed/s")
    throughput.set_xlabel("offered tasks/s")
    throughput.set_title("achieved rate", fontsize=10)
    throughput.legend(fontsize=8)
    figure.suptitle(f"async path, {report['path']}; {report['machine']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


@click.command()
@click.option("--rates", default="50,100,200,500,1000,1500,2000", show_default=True,
              help="Offered tasks/s, one step each, in order.")  # fmt: skip
@click.option("--seconds", default=10.0, show_default=True, help="Length of each step.")
@click.option("--direct", is_flag=True, help="Accept at async_predict itself, not the gateway.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=REPO_ROOT / "docs/benchmarks", show_default=True)  # fmt: skip
def main(rates: str, seconds: float, direct: bool, out: Path) -> None:
    settings = get_settings()
    stack = DevStack(
        port=free_port(),
        database_url=settings.database_url,
        kafka_bootstrap_servers=settings.kafka_bootstrap_servers,
        quiet=True,
    )
    stack.start()
    steps: list[dict[str, Any]] = []
    try:
        url = stack.urls["async_predict" if direct else "gateway"]
        run_step(stack, url, 20, 1.0)  # warm-up: connections, pools, the model
        for rate in (int(each) for each in rates.split(",")):
            step = run_step(stack, url, rate, seconds)
            steps.append(step)
            print(
                f"{rate:>6}/s offered: {step['completed_per_s']:7.0f}/s completed, accept p99"
                f" {_ms(step['accept_p99_ms'])} ms, accept → completed p99"
                f" {_ms(step['e2e_p99_ms'])} ms, {step['cpu_ms_per_task_total']:.1f} ms CPU/task",
                flush=True,
            )
            if step["saturated"]:
                break
    finally:
        stack.stop()
    report = {
        "machine": outputs.machine(),
        "path": "straight to async_predict" if direct else "through the dev gateway",
        "seconds": seconds,
        "steps": steps,
    }
    outputs.write(out, "async", report, markdown, plot)


if __name__ == "__main__":
    main()
