"""`/predict` throughput and server CPU per request, one worker, server and load generator
pinned to different cores (wrk, from Debian's `wrk` package), alternating runs.

    python -m benchmarks.predict_cpu [--runs 3] [--seconds 10] [--connections 16]

Prints req/s and server CPU µs per request (user + system of the gunicorn master and worker),
per run and as medians.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import httpx
import psutil

from moderation.dev.ports import free_port
from moderation.dev.stack import REPO_ROOT, function_command

AD = (
    '{"seller_id": 1, "is_verified_seller": false, "item_id": 1, "name": "Phone",'
    ' "description": "Test Description", "category": 1, "images_qty": 0}'
)
WRK_SCRIPT = f"""wrk.method = "POST"
wrk.body = '{AD}'
wrk.headers["Content-Type"] = "application/json"
"""


def cpu_seconds(process: psutil.Process) -> float:
    total = 0.0
    for each in [process, *process.children(recursive=True)]:
        times = each.cpu_times()
        total += times.user + times.system
    return total


def one_run(seconds: int, connections: int, script: Path, extra_env: dict[str, str]) -> dict:
    port = free_port()
    env = {**os.environ, "WORKERS": "1", **extra_env}
    command = ["taskset", "-c", "0", *function_command("predict", port)]
    # Its log lines (one access line per request) go to /dev/null: written, never read.
    server = subprocess.Popen(
        command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{port}/predict"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.post(url, content=AD, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        process = psutil.Process(server.pid)
        # Warm up, then measure.
        subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", "-d2s",
                        "-s", str(script), url], capture_output=True, check=True)  # fmt: skip
        before = cpu_seconds(process)
        output = subprocess.run(
            ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
             "-s", str(script), url], capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        used = cpu_seconds(process) - before
        summary = next(line for line in output.splitlines() if "requests in" in line)
        requests = int(summary.split()[0])
        non_2xx = sum(int(line.split()[-1]) for line in output.splitlines() if "Non-2xx" in line)
        return {
            "req_s": requests / seconds,
            "cpu_us": used / requests * 1e6,
            "non_2xx": non_2xx,
        }
    finally:
        server.terminate()
        server.wait(30)


@click.command()
@click.option("--runs", default=3, show_default=True)
@click.option("--seconds", default=10, show_default=True)
@click.option("--connections", default=16, show_default=True)
@click.option("--env", "env_pairs", multiple=True, help="KEY=VALUE for the server, repeatable.")
def main(runs: int, seconds: int, connections: int, env_pairs: tuple[str, ...]) -> None:
    if shutil.which("wrk") is None:
        sys.exit("error: wrk is not installed (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(WRK_SCRIPT)
        extra_env = dict(pair.split("=", 1) for pair in env_pairs)
        results = [one_run(seconds, connections, script, extra_env) for _ in range(runs)]
    for number, result in enumerate(results, 1):
        print(f"run {number}: {result['req_s']:,.0f} req/s, {result['cpu_us']:.0f} µs CPU/request,"
              f" non-2xx {result['non_2xx']}")  # fmt: skip
    print(
        f"median: {statistics.median(r['req_s'] for r in results):,.0f} req/s, "
        f"{statistics.median(r['cpu_us'] for r in results):.0f} µs CPU/request"
    )


if __name__ == "__main__":
    main()
