"""Cold start: process start to first 200 from /predict, ONNX (the product) vs a pickled
scikit-learn model (the original service's way), on this machine, in one run.

    python -m benchmarks.cold_start [--runs 5]
"""

from __future__ import annotations

import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import httpx

from model_export.training import train_default
from moderation.dev.ports import free_port
from moderation.dev.stack import function_command

ROOT = Path(__file__).resolve().parent.parent
AD = {
    "seller_id": 1, "is_verified_seller": False, "item_id": 1, "name": "Phone",
    "description": "Test Description", "category": 1, "images_qty": 0,
}  # fmt: skip


def time_to_first_200(command: list[str], env: dict[str, str], port: int) -> float:
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        deadline = started + 60
        while time.perf_counter() < deadline:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/predict", json=AD, timeout=5)
                if response.status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.005)
        raise RuntimeError("no 200 within 60 s")
    finally:
        process.terminate()
        process.wait(30)


@click.command()
@click.option("--runs", default=5, show_default=True)
def main(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pickle_path = Path(tmp) / "model.pkl"
        pickle_path.write_bytes(pickle.dumps(train_default().model))
        env = {**os.environ, "MODEL_PICKLE": str(pickle_path)}
        variants = {
            "onnx (functions/predict)": lambda port: function_command("predict", port),
            "pickled scikit-learn": lambda port: [
                sys.executable,
                "-m",
                "functions_framework",
                "--target",
                "predict",
                "--source",
                str(ROOT / "benchmarks/baseline_sklearn/main.py"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
        }
        results: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(runs):  # interleaved, so drift on the machine hits both alike
            for name, command in variants.items():
                port = free_port()
                results[name].append(time_to_first_200(command(port), env, port))
    print(f"cold start, process start to first 200 from /predict ({runs} runs each)")
    for name, times in results.items():
        print(
            f"  {name:<26} median {statistics.median(times):.3f} s"
            f"  min {min(times):.3f} s  max {max(times):.3f} s"
        )
    onnx, sk = (statistics.median(t) for t in results.values())
    print(f"  ratio scikit-learn / onnx: {sk / onnx:.2f}x")


if __name__ == "__main__":
    main()
