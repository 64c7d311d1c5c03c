"""Fitting the logistic regression and measuring it on held-out rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from model_export.data import (
    SYNTHETIC_HOLDOUT_SEED,
    SYNTHETIC_ROWS,
    SYNTHETIC_RULE,
    SYNTHETIC_SEED,
    DataError,
    load_csv,
    synthetic_data,
)
from shared.model_contract import DEFAULT_THRESHOLD

DEFAULT_TEST_SIZE = 0.2
DEFAULT_SPLIT_SEED = 42


@dataclass(frozen=True)
class TrainingResult:
    """A fitted model, the rows it was measured on, and what model.json says about its training."""

    model: LogisticRegression
    X_holdout: np.ndarray
    y_holdout: np.ndarray
    metrics: dict[str, Any]
    # The threshold the metrics were measured at; model.json records the same one.
    threshold: float
    training_data: dict[str, Any] = field(default_factory=dict)


def holdout_metrics(
    y_true: np.ndarray, probability: np.ndarray, threshold: float = DEFAULT_THRESHOLD
) -> dict[str, Any]:
    """ROC AUC and precision/recall at the threshold; None where a metric is undefined.

    None rather than NaN or 0: it is valid JSON and does not pass for a real score.
    """
    y_true = np.asarray(y_true, dtype=int)
    predicted = np.asarray(probability) >= threshold
    positives = int(y_true.sum())
    true_pos = int(np.sum(predicted & (y_true == 1)))
    flagged = int(predicted.sum())
    # AUC needs both classes in the hold-out; otherwise it is undefined, not a crash.
    auc = float(roc_auc_score(y_true, probability)) if 0 < positives < len(y_true) else None
    return {
        "rows": len(y_true),
        "positives": positives,
        "threshold": threshold,
        "roc_auc": auc,
        "precision": true_pos / flagged if flagged else None,
        "recall": true_pos / positives if positives else None,
    }


def train_default(threshold: float = DEFAULT_THRESHOLD) -> TrainingResult:
    """The original service's model: LogisticRegression() on all 1000 synthetic rows (seed 42)."""
    train = synthetic_data(SYNTHETIC_SEED, SYNTHETIC_ROWS)
    model = LogisticRegression().fit(train.X, train.y)
    holdout = synthetic_data(SYNTHETIC_HOLDOUT_SEED, SYNTHETIC_ROWS)
    return TrainingResult(
        model=model,
        X_holdout=holdout.X,
        y_holdout=holdout.y,
        metrics=holdout_metrics(holdout.y, model.predict_proba(holdout.X)[:, 1], threshold),
        threshold=threshold,
        training_data={
            "source": "synthetic",
            "seed": SYNTHETIC_SEED,
            "rows": train.rows,
            "rule": SYNTHETIC_RULE,
            "holdout": {
                "source": "synthetic",
                "seed": SYNTHETIC_HOLDOUT_SEED,
                "rows": holdout.rows,
            },
        },
    )


def train_from_csv(
    path: Path,
    threshold: float = DEFAULT_THRESHOLD,
    test_size: float = DEFAULT_TEST_SIZE,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> TrainingResult:
    """Fit on a stratified train split of a labelled CSV and measure on the rest."""
    data = load_csv(path)
    try:
        X_train, X_holdout, y_train, y_holdout = train_test_split(
            data.X, data.y, test_size=test_size, stratify=data.y, random_state=split_seed
        )
    except ValueError as exc:
        # Too few rows of a class to put one on each side of a stratified split.
        counts = np.bincount(data.y, minlength=2)
        raise DataError(
            f"{data.file_name}: cannot split {data.rows} rows ({counts[1]} violations, "
            f"{counts[0]} non-violations) into train and hold-out: {exc}"
        ) from None
    model = LogisticRegression().fit(X_train, y_train)
    return TrainingResult(
        model=model,
        X_holdout=X_holdout,
        y_holdout=y_holdout,
        metrics=holdout_metrics(y_holdout, model.predict_proba(X_holdout)[:, 1], threshold),
        threshold=threshold,
        training_data={
            "source": "csv",
            "file": data.file_name,
            "sha256": data.sha256,
            "rows": data.rows,
            "train_rows": len(y_train),
            "holdout_rows": len(y_holdout),
            "test_size": test_size,
            "seed": split_seed,
        },
    )
