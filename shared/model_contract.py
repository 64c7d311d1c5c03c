"""The model contract: feature order and scaling, threshold, metadata format.

One home for what `model_export` writes and the runtime checks when it loads a model,
so a model trained on other features can never be served silently.
"""

from __future__ import annotations

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
