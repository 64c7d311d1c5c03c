"""The model contract: feature order and scaling, threshold, metadata format.

One home for what `model_export` writes and the runtime checks when it loads a model,
so a model trained on other features can never be served silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

# Bump when the meaning of the features changes; a model.json of another version is refused.
CONTRACT_VERSION = 1

# Order matters: it is the column order of the model's input tensor.
FEATURES: tuple[str, ...] = (
    "is_verified_seller",  # 1.0 or 0.0
    "images_qty",  # images_qty / 10
    "description_length",  # len(description) / 1000
    "category",  # category / 100
)

DEFAULT_THRESHOLD = 0.5
INPUT_NAME = "features"
PROBABILITY_OUTPUT = "probabilities"


class AdLike(Protocol):
    """Whatever carries the ad fields the model reads (a pydantic Ad, a database row)."""

    @property
    def is_verified_seller(self) -> bool: ...
    @property
    def images_qty(self) -> int: ...
    @property
    def description(self) -> str: ...
    @property
    def category(self) -> int: ...


def feature_row(
    is_verified_seller: bool, images_qty: int, description: str, category: int
) -> list[float]:
    """The model's input row for one ad, in FEATURES order."""
    return [
        1.0 if is_verified_seller else 0.0,
        images_qty / 10,
        len(description) / 1000,
        category / 100,
    ]


def feature_matrix(ads: Iterable[AdLike]) -> np.ndarray:
    """A float64 matrix (n, len(FEATURES)) for a batch of ads."""
    rows = [
        feature_row(ad.is_verified_seller, ad.images_qty, ad.description, ad.category) for ad in ads
    ]
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURES))


# model.json may describe the model as linear: P(violation) = sigmoid(weights · row + intercept).
# Serving then scores a single row in plain Python (~1 µs) instead of through onnxruntime (its
# numpy matrix, run and result cost a busy server ~60 µs a request); the weights are checked
# against the ONNX graph when the model loads, and batches always go through onnxruntime.
LINEAR_KEY = "linear"


def linear_metadata(weights: Iterable[float], intercept: float) -> dict[str, Any]:
    return {"weights": [float(w) for w in weights], "intercept": float(intercept)}


def linear_weights(metadata: dict[str, Any]) -> tuple[tuple[float, ...], float] | None:
    """The weights and intercept of model.json's `linear` entry, or None if it has none (or
    one of the wrong shape)."""
    linear = metadata.get(LINEAR_KEY)
    if not isinstance(linear, dict):
        return None
    weights, intercept = linear.get("weights"), linear.get("intercept")
    if not isinstance(weights, list) or len(weights) != len(FEATURES):
        return None
    numbers = [*weights, intercept]
    if not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers):
        return None
    try:
        floats = [float(n) for n in numbers]  # an int beyond float's range overflows here
    except OverflowError:
        return None
    if not all(math.isfinite(n) for n in floats):
        return None
    return tuple(floats[:-1]), floats[-1]


# The plain-Python score is trusted only where float64 rounding cannot move it: with terms this
# large, the sum's order (ours, or onnxruntime's matrix product) changes z by more than 1e-13.
LINEAR_MAX_TERMS = 1e3


def linear_probability(
    weights: tuple[float, ...], intercept: float, row: list[float]
) -> float | None:
    """sigmoid(weights · row + intercept) as skl2onnx's graph computes it (both classes'
    sigmoids, normalized), within 1e-12 of onnxruntime's answer; None where that cannot be
    promised (terms beyond LINEAR_MAX_TERMS, or not finite): such a row goes to onnxruntime."""
    z = 0.0
    magnitude = abs(intercept)
    for weight, value in zip(weights, row, strict=True):
        term = weight * value
        z += term
        magnitude += abs(term)
    if not magnitude <= LINEAR_MAX_TERMS:  # also NaN
        return None
    z += intercept  # after the dot product, as the graph adds it
    if not -700.0 < z < 700.0:  # exp() would overflow; it is 0 or 1 in float64 anyway
        return 0.0 if z < 0 else 1.0
    violation = 1.0 / (1.0 + math.exp(-z))
    return violation / (violation + 1.0 / (1.0 + math.exp(z)))


def contract_metadata() -> dict[str, Any]:
    """The part of model.json that the runtime checks before serving a model."""
    return {"contract_version": CONTRACT_VERSION, "features": list(FEATURES)}


def contract_mismatch(metadata: dict[str, Any]) -> str | None:
    """Why a model's metadata does not fit this contract, or None if it fits."""
    if metadata.get("contract_version") != CONTRACT_VERSION:
        return (
            f"contract_version {metadata.get('contract_version')!r} "
            f"is not the supported {CONTRACT_VERSION}"
        )
    if list(metadata.get("features", [])) != list(FEATURES):
        return f"features {metadata.get('features')!r} are not {list(FEATURES)}"
    threshold = metadata.get("threshold")
    if not isinstance(threshold, int | float) or not 0.0 < threshold < 1.0:
        return f"threshold {threshold!r} is not a number between 0 and 1"
    if not isinstance(metadata.get("version"), str):
        return "version is missing"
    return None
