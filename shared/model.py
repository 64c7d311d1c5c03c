"""The ONNX model at serving time: loaded lazily, once per process, never at import.

onnxruntime itself is imported lazily too: importing it starts threads, and
functions-framework imports the function module in the gunicorn master before forking.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from shared import metrics, model_contract
from shared.config import get_settings
from shared.errors import ModelUnavailable, ScoringFailed

log = logging.getLogger(__name__)

# Looked up once: the per-call cost is then one bucket and one counter update.
_observe_inference = metrics.INFERENCE.observe
_count_violations = metrics.PREDICTIONS.labels("violation").inc
_count_ok = metrics.PREDICTIONS.labels("ok").inc


class _SingleRowCounts:
    """Single rows scored in plain Python take ~1 µs, less than a counter's lock: they are
    counted here and added to the metrics in batches (with the HTTP requests', see
    shared/http.py, before /metrics answers, and every 200 rows). They are not timed:
    moderation_inference_seconds times onnxruntime calls."""

    def __init__(self) -> None:
        self.rows = 0
        self.violations = 0

    def add(self, violation: bool) -> None:
        self.rows += 1
        self.violations += violation
        if self.rows >= 200:
            self.flush()

    def flush(self) -> None:
        rows, violations = self.rows, self.violations
        self.rows = self.violations = 0
        if violations:
            _count_violations(violations)
        if rows > violations:
            _count_ok(rows - violations)


_single_rows = _SingleRowCounts()
metrics.on_flush(_single_rows.flush)


class Score(NamedTuple):  # a tuple: made once per request on the hot path
    is_violation: bool
    probability: float


class Model:
    """An ONNX session plus the metadata that says how to read it."""

    def __init__(self, session: Any, metadata: dict[str, Any]) -> None:
        self._session = session
        self.version: str = metadata["version"]
        self.threshold: float = float(metadata["threshold"])
        self._input = metadata.get("input_name", model_contract.INPUT_NAME)
        self._output = metadata.get("output_name", model_contract.PROBABILITY_OUTPUT)
        # Weights for scoring one row in plain Python; load_model keeps them only if they
        # give the ONNX graph's answers.
        self.linear = model_contract.linear_weights(metadata)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Violation probability per row of a (n, len(FEATURES)) float64 matrix."""
        try:
            started = time.perf_counter()
            (probabilities,) = self._session.run([self._output], {self._input: features})
            _observe_inference(time.perf_counter() - started)
            return np.asarray(probabilities)[:, 1]
        except Exception as error:  # onnxruntime raises its own exception types
            log.exception("model inference failed")
            raise ScoringFailed() from error

    def score_one(self, ad: model_contract.AdLike) -> Score:
        """One ad: in plain Python when the model is linear, else through onnxruntime."""
        if self.linear is None:
            (score,) = self.score([ad])
            return score
        row = model_contract.feature_row(
            ad.is_verified_seller, ad.images_qty, ad.description, ad.category
        )
        probability = model_contract.linear_probability(*self.linear, row)
        # Where rounding could put it on the other side of the threshold than onnxruntime
        # would (or it cannot be promised at all), onnxruntime decides.
        if probability is None or abs(probability - self.threshold) <= NEAR_THRESHOLD:
            (score,) = self.score([ad])
            return score
        violation = probability >= self.threshold
        _single_rows.add(violation)
        return Score(violation, probability)

    def score(self, ads: Sequence[model_contract.AdLike]) -> list[Score]:
        if not ads:
            return []
        probabilities = self.probabilities(model_contract.feature_matrix(ads))
        scores = [
            Score(is_violation=bool(p >= self.threshold), probability=float(p))
            for p in probabilities
        ]
        violations = sum(score.is_violation for score in scores)
        if violations:
            _count_violations(violations)
        if violations < len(scores):
            _count_ok(len(scores) - violations)
        return scores


def load_model(path: Path) -> Model:
    """Load model.onnx and the model.json beside it; refuse a model that breaks the contract."""
    metadata_path = path.with_suffix(".json")
    try:
        metadata = json.loads(metadata_path.read_text())
    except FileNotFoundError:
        raise ModelUnavailable(
            f"model metadata {metadata_path.name} not found beside {path}"
        ) from None
    except (OSError, ValueError) as error:
        raise ModelUnavailable(f"model metadata {metadata_path} is unreadable: {error}") from None
    if not isinstance(metadata, dict):
        raise ModelUnavailable(f"model metadata {metadata_path} is not a JSON object")
    mismatch = model_contract.contract_mismatch(metadata)
    if mismatch:
        raise ModelUnavailable(f"model {path} does not fit the feature contract: {mismatch}")

    import onnxruntime

    options = onnxruntime.SessionOptions()
    # One small row at a time: extra intra-op threads only add wake-up latency.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # missing file, corrupt graph: onnxruntime's own types
        raise ModelUnavailable(f"model {path} cannot be loaded: {error}") from None
    model = Model(session, metadata)
    # Fail at load, not at the first request, if the graph does not answer as the contract says.
    model.probabilities(np.zeros((1, len(model_contract.FEATURES)), dtype=np.float64))
    if model_contract.LINEAR_KEY in metadata and model.linear is None:
        log.warning(
            "model.json's %r entry is not %d finite weights and an intercept: every row is "
            "scored with onnxruntime", model_contract.LINEAR_KEY, len(model_contract.FEATURES),
        )  # fmt: skip
    if model.linear is not None:
        disagreement = linear_disagreement(model, model.linear)
        if not disagreement <= LINEAR_TOLERANCE:  # also NaN
            log.warning(
                "model.json's linear weights differ from %s by up to %.3g: every row is "
                "scored with onnxruntime", path.name, disagreement,
            )  # fmt: skip
            model.linear = None
    return model


# How far the plain-Python score of one row may be from onnxruntime's, and how close to the
# threshold a score must be for onnxruntime to decide instead.
LINEAR_TOLERANCE = 1e-12
NEAR_THRESHOLD = 1e-9


def linear_disagreement(model: Model, linear: tuple[tuple[float, ...], float]) -> float:
    """The largest difference between the linear weights' probability and the ONNX graph's,
    over a grid of ordinary ads (rows beyond LINEAR_MAX_TERMS go to onnxruntime anyway)."""
    rows = [
        model_contract.feature_row(verified, images, "x" * length, category)
        for verified in (False, True)
        for images in (0, 1, 2, 3, 5, 8, 13, 40)
        for length in (0, 10, 100, 500, 2000, 10000)
        for category in (-100, 0, 1, 7, 50, 300)
    ]
    expected = model.probabilities(np.asarray(rows, dtype=np.float64))
    differences = []
    for row, probability in zip(rows, expected, strict=True):
        ours = model_contract.linear_probability(*linear, row)
        if ours is not None:
            differences.append(abs(ours - float(probability)))
    if any(math.isnan(difference) for difference in differences):
        return math.nan  # (max() would pass over it)
    return max(differences, default=0.0)


# After a failed load, requests are answered 503 at once for this long before loading again,
# so a broken model file is not re-read on every request.
RELOAD_AFTER_FAILURE_SECONDS = 1.0

_lock = threading.Lock()
_model: Model | None = None
_last_error: str | None = None
_failed_at = float("-inf")


def get_model() -> Model:
    """The process's model; loads it on first use, tries again (at most once a second) if that
    failed, so a model that appears later is picked up."""
    global _model, _last_error, _failed_at
    if _model is not None:
        return _model
    with _lock:
        if _model is None:
            if time.monotonic() - _failed_at < RELOAD_AFTER_FAILURE_SECONDS:
                raise ModelUnavailable()
            path = get_settings().model_path
            try:
                _model = load_model(path)
            except (ModelUnavailable, ScoringFailed) as error:
                _failed_at = time.monotonic()
                message = str(error)
                if message != _last_error:  # one log line per distinct failure, not per request
                    log.error("model is not available: %s", message)
                    _last_error = message
                raise ModelUnavailable() from error
            _last_error = None
            log.info("model %s loaded from %s", _model.version, path)
    return _model


async def ready() -> bool:
    """For /ready: the model is loaded, or loads now."""
    try:
        get_model()
    except ModelUnavailable:
        return False
    return True


def reset() -> None:
    """Forget the loaded model (tests, or a process that swaps MODEL_PATH)."""
    global _model, _last_error, _failed_at
    with _lock:
        _model = None
        _last_error = None
        _failed_at = float("-inf")
