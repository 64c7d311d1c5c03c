"""ONNX/scikit-learn parity: the exported graph must give the same probabilities as the model."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from shared.model_contract import FEATURES, INPUT_NAME, PROBABILITY_OUTPUT, feature_row

# Float64 end to end, so anything beyond rounding noise is a conversion bug.
PARITY_TOLERANCE = 1e-6
RANDOM_FIXTURE_ROWS = 300
FIXTURE_SEED = 7

# Ads the original service was checked against (see tests/unit/test_model_export.py).
REFERENCE_ADS: tuple[tuple[bool, int, str, int], ...] = (
    (False, 0, "Test Description", 1),
    (False, 1, "Test Description", 1),
    (False, 1, "Short description", 50),
    (True, 8, "Test Description", 75),
    (True, 5, "Test Description", 1),
)


class ParityError(Exception):
    """The ONNX model does not reproduce the scikit-learn model; nothing may be written."""


def reference_matrix() -> np.ndarray:
    return np.asarray([feature_row(*ad) for ad in REFERENCE_ADS], dtype=np.float64)


def parity_fixture(X_holdout: np.ndarray, seed: int = FIXTURE_SEED) -> np.ndarray:
    """Hold-out rows, random rows over (and beyond) realistic feature ranges, reference ads."""
    rng = np.random.default_rng(seed)
    # Scaled ranges: verified 0/1, up to 20 images, 3000-char descriptions, category up to 200.
    random_rows = np.column_stack(
        [
            rng.integers(0, 2, RANDOM_FIXTURE_ROWS).astype(np.float64),
            rng.integers(0, 21, RANDOM_FIXTURE_ROWS) / 10,
            rng.integers(0, 3001, RANDOM_FIXTURE_ROWS) / 1000,
            rng.integers(0, 201, RANDOM_FIXTURE_ROWS) / 100,
        ]
    )
    return np.vstack(
        [
            np.asarray(X_holdout, dtype=np.float64).reshape(-1, len(FEATURES)),
            random_rows,
            reference_matrix(),
        ]
    )


def onnx_probabilities(onnx_bytes: bytes, X: np.ndarray) -> np.ndarray:
    """Run the ONNX model the way serving does and return its (n, 2) probability tensor."""
    try:
        session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for invalid models
        raise ParityError(f"onnxruntime cannot load the exported model: {exc}") from exc
    inputs = [node.name for node in session.get_inputs()]
    outputs = [node.name for node in session.get_outputs()]
    if inputs != [INPUT_NAME]:
        raise ParityError(f"ONNX inputs are {inputs}, expected [{INPUT_NAME!r}]")
    if PROBABILITY_OUTPUT not in outputs:
        raise ParityError(f"ONNX outputs {outputs} lack {PROBABILITY_OUTPUT!r}")
    (result,) = session.run([PROBABILITY_OUTPUT], {INPUT_NAME: np.asarray(X, dtype=np.float64)})
    return np.asarray(result)


def verify_parity(
    sklearn_model: Any, onnx_bytes: bytes, X: np.ndarray, tolerance: float = PARITY_TOLERANCE
) -> float:
    """Max abs difference of predict_proba vs ONNX over X; raises ParityError beyond tolerance."""
    expected = sklearn_model.predict_proba(X)
    actual = onnx_probabilities(onnx_bytes, X)
    if actual.shape != expected.shape or actual.dtype != np.float64:
        raise ParityError(
            f"ONNX {PROBABILITY_OUTPUT!r} is {actual.dtype} {actual.shape}, "
            f"expected float64 {expected.shape}"
        )
    diff = float(np.max(np.abs(actual - expected)))
    # Written so NaN (which compares False to everything) counts as a failure.
    if not diff <= tolerance:
        raise ParityError(
            f"ONNX and scikit-learn probabilities differ by up to {diff:.3g} "
            f"on {len(X)} fixture rows (tolerance {tolerance:g})"
        )
    return diff
