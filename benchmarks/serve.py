"""`/predict` side by side: the project's `predict`, the framework's floor (a functions-framework
aio function answering a constant, `benchmarks/floor`) and the original service's shape (FastAPI +
pickled scikit-learn under uvicorn, `benchmarks/baseline_fastapi`).

    python -m benchmarks.serve [--runs 5] [--seconds 10] [--connections 16] [--out docs/benchmarks]

Each server runs with one worker pinned to CPU 0, the load generator to CPU 1; the variants take
turns, `--runs` times. Per variant it reports medians of req/s, p50/p99 latency, server CPU µs
per request, cold start (process start to first 200) and the worker's resident memory; for the
project also `/predict/batch` rows/s over HTTP (1,000-item batches) and in process. The load
generator is `wrk` when it is installed, else `benchmarks.loadgen` (asyncio, much slower); the
CPU share of both sides says which one was the limit. Writes serve.json, serve.md and serve.png.
"""

from __future__ import annotations

import json
import os
import pickle  # nosec B403: the benchmark pickles a model it trained itself
import re
import resource
import shutil
import statistics
import subprocess  # nosec B404
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import httpx
import psutil

from benchmarks import outputs
from moderation.dev.ports import free_port
from moderation.dev.stack import REPO_ROOT, function_command

AD = {
    "seller_id": 1, "is_verified_seller": False, "item_id": 1, "name": "Phone",
    "description": "Test Description", "category": 1, "images_qty": 0,
}  # fmt: skip
FLOOR = REPO_ROOT / "benchmarks/floor/main.py"
BASELINE = "benchmarks.baseline_fastapi.main:app"
BARE_ASGI = "benchmarks.floor.asgi:app"
BATCH_ITEMS = 1000
SERVER_CPU, CLIENT_CPU = "0", "1"
_JSON = {"Content-Type": "application/json"}
SATURATED = 0.9  # a side using 90 % of its core is the limit

GOALS = {
    "cpu_ratio": ("predict CPU per request / floor's", "≤", 1.25),
    "throughput_ratio": ("predict req/s / FastAPI + pickle's", "≥", 3.0),
    "cold_start_s": ("predict cold start to first 200, s", "≤", 0.45),
    "batch_rows_s_in_process": ("batch scoring in process, rows/s", "≥", 200_000),
    "batch_rows_s_http": ("/predict/batch over HTTP, 1,000-item batches, rows/s", "≥", 100_000),
    "worker_rss_mb": ("predict worker RSS after its first request, MB", "≤", 85),
}


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    command: Callable[[int], list[str]]
    path: str = "/predict"
    body: str = "ad"  # "ad" or "batch"


def _framework(source: Path) -> Callable[[int], list[str]]:
    return lambda port: [
        sys.executable, "-m", "functions_framework", "--target", "predict",
        "--source", str(source), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def _uvicorn(app: str) -> Callable[[int], list[str]]:
    return lambda port: [
        sys.executable, "-m", "uvicorn", app,
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip


def _predict(port: int) -> list[str]:
    return function_command("predict", port)


VARIANTS = (
    Variant("predict", "functions/predict (ONNX)", _predict),
    Variant("floor", "floor: aio function, constant reply", _framework(FLOOR)),
    Variant("fastapi_pickle", "FastAPI + pickled scikit-learn", _uvicorn(BASELINE)),
    Variant("asgi", "bare ASGI app under uvicorn, constant reply", _uvicorn(BARE_ASGI)),
    Variant(
        "predict_batch", "functions/predict /predict/batch", _predict, "/predict/batch", "batch"
    ),
)


def _tree(process: psutil.Process) -> list[psutil.Process]:
    return [process, *process.children(recursive=True)]


def cpu_seconds(process: psutil.Process) -> float:
    total = 0.0
    for each in _tree(process):
        times = each.cpu_times()
        total += times.user + times.system
    return total


def worker_rss_mb(process: psutil.Process) -> float:
    """The serving process's resident memory: the leaf (gunicorn's worker, or uvicorn itself)."""
    leaves = [each for each in _tree(process) if not each.children()]
    return max(each.memory_info().rss for each in leaves) / 2**20


def tree_uss_mb(process: psutil.Process) -> float:
    """Memory the server's processes hold of their own (gunicorn's master and worker, or
    uvicorn's one process), shared library pages not counted twice."""
    return sum(each.memory_full_info().uss for each in _tree(process)) / 2**20


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_WRK_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk(url: str, body: Path, connections: int, seconds: int, script: Path) -> dict[str, float]:
    output = subprocess.run(
        ["taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
         "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    summary = next(line for line in output.splitlines() if "requests in" in line)
    latency = {
        pct: float(value) * _UNIT_MS[unit] for pct, value, unit in _WRK_LATENCY.findall(output)
    }
    # "Socket errors: connect 0, read 0, write 0, timeout 3": failed requests too.
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    return {
        "requests": int(summary.split()[0]),
        "non_2xx": errors
        + sum(int(line.split()[-1]) for line in output.splitlines() if "Non-2xx" in line),
        "p50_ms": latency["50"],
        "p99_ms": latency["99"],
    }


def _asyncio(
    url: str, body: Path, connections: int, seconds: int, script: Path
) -> dict[str, float]:
    output = subprocess.run(
        ["taskset", "-c", CLIENT_CPU, sys.executable, "-m", "benchmarks.loadgen", url, str(body),
         "--connections", str(connections), "--seconds", str(seconds)],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    ).stdout  # fmt: skip
    return json.loads(output)


def wait_first_200(url: str, body: bytes, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.post(url, content=body, headers=_JSON, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"{url}: no 200 within 60 s")


class Bench:
    def __init__(
        self, workdir: Path, seconds: int, warmup: int, connections: int, generator: str,
        env: dict[str, str],
    ) -> None:  # fmt: skip
        self.workdir = workdir
        self.seconds, self.warmup, self.connections = seconds, warmup, connections
        self.generator_name = "wrk" if generator == "wrk" else "asyncio (benchmarks.loadgen)"
        self.generate = _wrk if generator == "wrk" else _asyncio
        self.env = {**os.environ, "WORKERS": "1", **env}
        self.bodies: dict[str, Path] = {}
        for name, content in (("ad", AD), ("batch", {"items": [AD] * BATCH_ITEMS})):
            path = workdir / f"{name}.json"
            path.write_text(json.dumps(content))
            script = workdir / f"{name}.lua"
            script.write_text(
                f'wrk.method = "POST"\nwrk.body = [[{path.read_text()}]]\n'
                'wrk.headers["Content-Type"] = "application/json"\n'
            )
            self.bodies[name] = path

    def run(self, variant: Variant) -> dict[str, Any]:
        port = free_port()
        url = f"http://127.0.0.1:{port}{variant.path}"
        body_path = self.bodies[variant.body]
        script = body_path.with_suffix(".lua")
        log = self.workdir / f"{variant.name}.log"
        # Metrics as the image keeps them: in memory with one worker, else in files
        # (prometheus-client's multiprocess mode).
        env = {**self.env}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if env["WORKERS"] != "1":
            env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(dir=self.workdir)
        started = time.perf_counter()
        with log.open("wb") as log_file:
            server = subprocess.Popen(
                ["taskset", "-c", SERVER_CPU, *variant.command(port)],
                env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log_file,
            )  # fmt: skip
        try:
            wait_first_200(url, body_path.read_bytes(), server, log)
            cold_start = time.perf_counter() - started
            process = psutil.Process(server.pid)
            rss_first = worker_rss_mb(process)
            if self.warmup:
                self.generate(url, body_path, self.connections, self.warmup, script)
            cpu_before, client_before = cpu_seconds(process), _children_cpu()
            window = time.perf_counter()
            result = self.generate(url, body_path, self.connections, self.seconds, script)
            window = time.perf_counter() - window  # with the generator's start and exit
            server_cpu = cpu_seconds(process) - cpu_before
            client_cpu = _children_cpu() - client_before
            rows = BATCH_ITEMS if variant.body == "batch" else 1
            return {
                "req_s": result["requests"] / self.seconds,
                "rows_s": result["requests"] * rows / self.seconds,
                "p50_ms": result["p50_ms"],
                "p99_ms": result["p99_ms"],
                "cpu_us": server_cpu / max(result["requests"], 1) * 1e6,
                "server_cpu_share": server_cpu / window,
                "client_cpu_share": client_cpu / window,
                "non_2xx": result["non_2xx"],
                "cold_start_s": cold_start,
                "rss_first_mb": rss_first,
                "rss_after_mb": worker_rss_mb(process),
                "tree_uss_mb": tree_uss_mb(process),
            }
        finally:
            server.terminate()
            server.wait(30)


def in_process_rows_s(seconds: float = 2.0) -> float:
    """Batch scoring without HTTP: features, one model call, the answer's objects."""
    from shared import scoring
    from shared.schemas import Ad

    ads = [Ad.model_validate(AD)] * BATCH_ITEMS
    scoring.predict_batch(ads)
    rows, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        scoring.predict_batch(ads)
        rows += BATCH_ITEMS
    return rows / (time.perf_counter() - started)


def summarize(runs: dict[str, list[dict[str, Any]]], in_process: list[float]) -> dict[str, Any]:
    medians = {
        name: {key: statistics.median(run[key] for run in results) for key in results[0]}
        for name, results in runs.items()
    }
    predict = medians["predict"]
    figures = {
        "cpu_ratio": predict["cpu_us"] / medians["floor"]["cpu_us"],
        "throughput_ratio": predict["req_s"] / medians["fastapi_pickle"]["req_s"],
        "cold_start_s": predict["cold_start_s"],
        "batch_rows_s_in_process": statistics.median(in_process),
        "batch_rows_s_http": medians["predict_batch"]["rows_s"],
        "worker_rss_mb": predict["rss_first_mb"],
    }
    goals = {}
    for key, (what, sign, target) in GOALS.items():
        value = figures[key]
        goals[key] = {
            "what": what,
            "value": value,
            "goal": f"{sign} {target:g}",
            "met": value <= target if sign == "≤" else value >= target,
        }
    return {"medians": medians, "goals": goals}


def limit_of(result: dict[str, float]) -> str:
    server, client = (result[key] >= SATURATED for key in ("server_cpu_share", "client_cpu_share"))
    if server and client:
        return "both (rerun with fewer connections)"
    return "server" if server else "load generator" if client else "neither"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"`python -m benchmarks.serve --runs {report['runs']} --seconds {report['seconds']}`"
        f" on {report['machine']}; load generator: {report['load_generator']}, "
        f"{report['connections']} connections; medians of {report['runs']} alternating runs.",
        "",
        "| variant | req/s | p50 ms | p99 ms | server CPU µs/req | cold start s"
        " | worker RSS MB (first → after) | all its processes, USS MB"
        " | CPU used: server / generator | limit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for variant in VARIANTS:
        m = report["medians"][variant.name]
        rate = f"{m['req_s']:,.0f}" if variant.body == "ad" else f"{m['rows_s']:,.0f} rows/s"
        lines.append(
            f"| {variant.label} | {rate} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f}"
            f" | {m['cpu_us']:.0f} | {m['cold_start_s']:.2f}"
            f" | {m['rss_first_mb']:.0f} → {m['rss_after_mb']:.0f} | {m['tree_uss_mb']:.0f}"
            f" | {m['server_cpu_share']:.0%} / {m['client_cpu_share']:.0%} | {limit_of(m)} |"
        )
    lines += ["", "| goal | measured | target | met |", "|---|---:|---:|---|"]
    for goal in report["goals"].values():
        value = goal["value"]
        shown = f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"
        lines.append(
            f"| {goal['what']} | {shown} | {goal['goal']} | {'yes' if goal['met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


_SHORT = {
    "predict": "predict\n(this project)",
    "floor": "floor\n(constant reply)",
    "fastapi_pickle": "FastAPI +\npickled sklearn",
    "asgi": "bare ASGI\n(uvicorn)",
}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = [v for v in VARIANTS if v.body == "ad"]
    labels = [_SHORT[v.name] for v in single]
    runs = report["runs_by_variant"]
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    panels = (
        (f"req/s (c{report['connections']})", "req_s"),
        ("server CPU µs per request", "cpu_us"),
        ("latency ms: p50 (bar), p99 (dot)", "p50_ms"),
    )
    for axis, (title, key) in zip(axes, panels, strict=True):
        values = [[run[key] for run in runs[v.name]] for v in single]
        axis.bar(
            labels,
            [statistics.median(each) for each in values],
            color=["#3b7dd8", "#9aa5b1", "#d8823b", "#c9ced4"],
        )
        for x, each in enumerate(values):  # every run, so the spread shows
            axis.scatter([x] * len(each), each, color="black", s=8, zorder=3)
        if key == "p50_ms":
            p99 = [statistics.median(run["p99_ms"] for run in runs[v.name]) for v in single]
            axis.scatter(range(len(single)), p99, color="red", marker="D", s=24, zorder=4)
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelsize=8)
    figure.suptitle(
        f"/predict, one worker, {report['machine']}; {report['load_generator']}", fontsize=10
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


@click.command()
@click.option("--runs", default=5, show_default=True, help="Alternating runs of each variant.")
@click.option("--seconds", default=10, show_default=True, help="Measured seconds per run.")
@click.option("--warmup", default=2, show_default=True, help="Unmeasured seconds before each run.")
@click.option("--connections", default=16, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=REPO_ROOT / "docs/benchmarks", show_default=True)  # fmt: skip
@click.option("--load-generator", "generator", type=click.Choice(["auto", "wrk", "asyncio"]),
              default="auto", show_default=True, help="auto: wrk if it is installed.")  # fmt: skip
@click.option("--env", "env_pairs", multiple=True, help="KEY=VALUE for the servers, repeatable.")
def main(
    runs: int, seconds: int, warmup: int, connections: int, out: Path, generator: str,
    env_pairs: tuple[str, ...],
) -> None:  # fmt: skip
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        sys.exit("error: needs taskset (util-linux) and two CPUs, one for each side")
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "asyncio"
    elif generator == "wrk" and shutil.which("wrk") is None:
        sys.exit("error: wrk is not installed (Debian: apt-get install wrk)")
    from model_export.training import train_default

    env = dict(pair.split("=", 1) for pair in env_pairs)
    results: dict[str, list[dict[str, Any]]] = {variant.name: [] for variant in VARIANTS}
    in_process: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pickled = workdir / "model.pkl"
        pickled.write_bytes(pickle.dumps(train_default().model))
        env = {"MODEL_PICKLE": str(pickled), **env}
        bench = Bench(workdir, seconds, warmup, connections, generator, env)
        for number in range(1, runs + 1):
            for variant in VARIANTS:  # in turn, so drift on the machine hits each alike
                result = bench.run(variant)
                results[variant.name].append(result)
                print(f"run {number} {variant.name:<15} {result['req_s']:>9,.0f} req/s "
                      f"{result['cpu_us']:>6.0f} µs CPU/req  p99 {result['p99_ms']:.2f} ms  "
                      f"limit: {limit_of(result)}", flush=True)  # fmt: skip
            in_process.append(in_process_rows_s(min(2.0, seconds)))
    report = {
        "runs": runs, "seconds": seconds, "connections": connections,
        "machine": outputs.machine(),
        "load_generator": bench.generator_name,
        **summarize(results, in_process),
        "runs_by_variant": results,
        "in_process_rows_s": in_process,
    }  # fmt: skip
    outputs.write(out, "serve", report, markdown, plot)


if __name__ == "__main__":
    main()
