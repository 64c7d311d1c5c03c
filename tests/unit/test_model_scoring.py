"""Scoring one ad in plain Python from the model's linear weights: the same answers as the
ONNX graph, and onnxruntime for every row when model.json's weights do not fit the graph."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.config import DEFAULT_MODEL_PATH
from shared.model import LINEAR_TOLERANCE, load_model
from shared.model_contract import linear_probability
from shared.schemas import Ad

INT32 = 2**31 - 1
ads = st.builds(
    Ad,
    seller_id=st.just(1),
    is_verified_seller=st.booleans(),
    item_id=st.just(1),
    name=st.just("x"),
    description=st.text(max_size=3000),
    category=st.integers(-INT32 - 1, INT32),
    images_qty=st.integers(0, INT32),
)

MODEL = load_model(DEFAULT_MODEL_PATH)


def test_the_shipped_model_scores_single_ads_in_python() -> None:
    assert MODEL.linear is not None


def ad(
    images_qty: int = 0, category: int = 1, description: str = "d", verified: bool = False
) -> Ad:
    return Ad(seller_id=1, is_verified_seller=verified, item_id=1, name="x",
              description=description, category=category, images_qty=images_qty)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(ad=ads)
# Terms that cancel: float64 sums of another order differ by ~1e-10 here (onnxruntime decides).
@example(ad=ad(1853004, -2031422395, "x" * 87743, verified=True))
@example(ad=ad(0, 1, "d"))
def test_one_ad_scores_as_the_onnx_graph_scores_it(ad: Ad) -> None:
    single = MODEL.score_one(ad)
    (through_onnx,) = MODEL.score([ad])
    assert single.probability == pytest.approx(through_onnx.probability, abs=LINEAR_TOLERANCE)
    assert single.is_violation == through_onnx.is_violation


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ([750.0, 0.0, 0.0, 0.0], 1.0),  # exp() would overflow: 0 or 1, as onnxruntime says
        ([-750.0, 0.0, 0.0, 0.0], 0.0),
        ([0.0, 0.0, 0.0, 0.0], 0.5),
        ([1e308, 0.0, 0.0, 0.0], None),  # terms too large to promise 1e-12: onnxruntime's
        ([1500.0, -1500.0, 0.0, 0.0], None),  # cancelling terms
        ([float("nan"), 0.0, 0.0, 0.0], None),
    ],
)
def test_linear_probability_answers_only_where_it_can_promise_onnxruntimes_answer(
    row: list[float], expected: float | None
) -> None:
    assert linear_probability((1.0, 1.0, 0.0, 0.0), 0.0, row) == expected


def test_an_ad_at_the_threshold_is_decided_by_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    one = ad(0, 1, "d")
    (through_onnx,) = MODEL.score([one])
    monkeypatch.setattr(MODEL, "threshold", through_onnx.probability)  # exactly at it
    assert MODEL.score_one(one) == MODEL.score([one])[0]


def _model_dir_with(tmp_path: Path, **linear: object) -> Path:
    shutil.copy(DEFAULT_MODEL_PATH, tmp_path / "model.onnx")
    metadata = json.loads(DEFAULT_MODEL_PATH.with_suffix(".json").read_text())
    metadata["linear"] = linear
    (tmp_path / "model.json").write_text(json.dumps(metadata))
    return tmp_path / "model.onnx"


def test_weights_that_do_not_fit_the_graph_are_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights, intercept = MODEL.linear or ((), 0.0)
    path = _model_dir_with(tmp_path, weights=[weights[0] + 1e-6, *weights[1:]], intercept=intercept)
    with caplog.at_level(logging.WARNING, logger="shared.model"):
        model = load_model(path)
    assert model.linear is None
    assert any("linear weights differ" in record.getMessage() for record in caplog.records)
    one = ad()
    assert model.score_one(one) == MODEL.score([one])[0]  # scored by onnxruntime, bit for bit


@pytest.mark.parametrize(
    "linear",
    [
        {"weights": [1.0, 2.0], "intercept": 0.0},  # not one per feature
        {"weights": [1.0, 2.0, 3.0, "4"], "intercept": 0.0},
        {"weights": [1.0, 2.0, 3.0, float("nan")], "intercept": 0.0},
        {"weights": [1.0, 2.0, 3.0, 10**400], "intercept": 0.0},  # beyond float64
        {"weights": [1.0, 2.0, 3.0, True], "intercept": 0.0},
        {"weights": [1.0, 2.0, 3.0, 4.0]},
    ],
)
def test_malformed_linear_entries_mean_onnxruntime_for_every_row_and_a_warning(
    tmp_path: Path, linear: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    path = _model_dir_with(tmp_path, **linear)
    with caplog.at_level(logging.WARNING, logger="shared.model"):
        assert load_model(path).linear is None
    assert any("scored with onnxruntime" in record.getMessage() for record in caplog.records)
