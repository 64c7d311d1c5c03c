"""Single-row inference: how serving scores one ad (plain Python from the linear weights), one
onnxruntime call, and scikit-learn's predict_proba (the original), in a tight loop.

python -m benchmarks.inference [--rows 20000]
"""

from __future__ import annotations

import statistics
import time

import click
import numpy as np

from model_export.training import train_default
from shared.config import DEFAULT_MODEL_PATH
from shared.model import load_model
from shared.model_contract import feature_matrix
from shared.schemas import Ad

AD = Ad(seller_id=1, is_verified_seller=False, item_id=1, name="Phone",
        description="Test Description", category=1, images_qty=0)  # fmt: skip


def per_call_us(call, repeats: int) -> list[float]:
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        samples.append((time.perf_counter() - started) / repeats * 1e6)
    return samples


@click.command()
@click.option("--rows", default=20000, show_default=True, help="Calls per sample (5 samples).")
def main(rows: int) -> None:
    onnx_model = load_model(DEFAULT_MODEL_PATH)
    sklearn_model = train_default().model
    features = feature_matrix([AD])
    assert np.allclose(
        onnx_model.probabilities(features), sklearn_model.predict_proba(features)[:, 1]
    )
    results = {
        "serving one ad (score_one)": per_call_us(lambda: onnx_model.score_one(AD), rows),
        "onnxruntime, features + run": per_call_us(lambda: onnx_model.score([AD]), rows),
        "onnxruntime, run only": per_call_us(lambda: onnx_model.probabilities(features), rows),
        "scikit-learn predict_proba": per_call_us(
            lambda: sklearn_model.predict_proba(features), rows
        ),
    }
    print(f"single-row inference, µs per call (median of 5 x {rows})")
    for name, samples in results.items():
        print(f"  {name:<30} {statistics.median(samples):8.1f} µs")
    ort = statistics.median(results["onnxruntime, run only"])
    sk = statistics.median(results["scikit-learn predict_proba"])
    print(f"  ratio scikit-learn / onnxruntime: {sk / ort:.1f}x")


if __name__ == "__main__":
    main()
