"""The side-by-side serving benchmark runs and writes what the README shows (its outputs, not
its timings: figures are read by people, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import serve
from tests.conftest import REPO_ROOT

WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:1/predict
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.49ms  410.21us   9.80ms   90.12%
  Latency Distribution
     50%    1.42ms
     75%    1.61ms
     90%    1.83ms
     99%  850.00us
  21000 requests in 2.00s, 3.1MB read
  Non-2xx or 3xx responses: 7
Requests/sec:  10500.00
"""


def test_wrk_output_is_read_with_its_units(monkeypatch, tmp_path: Path) -> None:
    completed = subprocess.CompletedProcess([], 0, stdout=WRK_OUTPUT, stderr="")
    monkeypatch.setattr(serve.subprocess, "run", lambda *args, **kwargs: completed)
    result = serve._wrk("http://127.0.0.1:1/predict", tmp_path, 16, 2, tmp_path / "x.lua")
    assert result == {"requests": 21000, "non_2xx": 7, "p50_ms": 1.42, "p99_ms": 0.85}


def test_a_tiny_run_writes_json_markdown_and_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.serve", "--runs", "1", "--seconds", "1",
         "--warmup", "0", "--connections", "2", "--load-generator", "asyncio", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((out / "serve.json").read_text())
    assert set(report["medians"]) == {variant.name for variant in serve.VARIANTS}
    for name, median in report["medians"].items():
        assert median["req_s"] > 0 and median["non_2xx"] == 0, name
        assert median["cpu_us"] > 0 and median["cold_start_s"] > 0 and median["rss_after_mb"] > 0
    assert set(report["goals"]) == set(serve.GOALS)
    assert report["load_generator"].startswith("asyncio")
    table = (out / "serve.md").read_text()
    assert all(variant.label in table for variant in serve.VARIANTS)
    assert (out / "serve.png").read_bytes().startswith(b"\x89PNG")


def test_a_tiny_async_run_writes_json_markdown_and_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.async_load", "--rates", "10,20", "--seconds", "1",
         "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((out / "async.json").read_text())
    assert [step["offered_per_s"] for step in report["steps"]] == [10, 20]
    for step in report["steps"]:
        assert step["tasks"] == step["offered_per_s"] and step["statuses"] == {
            "completed": step["tasks"]
        }
        assert step["accept_p99_ms"] > 0 and step["e2e_p99_ms"] > 0
        assert {"async_predict", "moderation_consumer", "adapter", "postgres", "broker"} <= set(
            step["cpu_ms_per_task"]
        )
    assert "| 20 |" in (out / "async.md").read_text()
    assert (out / "async.png").read_bytes().startswith(b"\x89PNG")
