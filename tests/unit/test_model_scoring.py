"""Scoring one ad in plain Python from the model's linear weights: the same answers as the
ONNX graph, and onnxruntime for every row when model.json's weights do not fit the graph."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
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


@settings(max_examples=300, deadline=None)
@given(ad=ads)
def test_one_ad_scores_as_the_onnx_graph_scores_it(ad: Ad) -> None:
    single = MODEL.score_one(ad)
    (through_onnx,) = MODEL.score([ad])
    assert single.probability == pytest.approx(through_onnx.probability, abs=LINEAR_TOLERANCE)
    assert 0.0 <= single.probability <= 1.0
    if abs(through_onnx.probability - MODEL.threshold) > LINEAR_TOLERANCE:
        assert single.is_violation == through_onnx.is_violation


@pytest.mark.parametrize("z", [-1e308, -750.0, -700.0, 0.0, 700.0, 750.0, 1e308])
def test_linear_probability_never_overflows(z: float) -> None:
    probability = linear_probability((1.0, 0.0, 0.0, 0.0), 0.0, [z, 0.0, 0.0, 0.0])
    assert probability == (0.5 if z == 0 else float(z > 0))


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
    ad = Ad(seller_id=1, is_verified_seller=False, item_id=1, name="x", description="d",
            category=1, images_qty=0)  # fmt: skip
    assert model.score_one(ad) == MODEL.score([ad])[0]  # scored by onnxruntime, bit for bit


@pytest.mark.parametrize(
    "linear",
    [
        {"weights": [1.0, 2.0], "intercept": 0.0},  # not one per feature
        {"weights": [1.0, 2.0, 3.0, "4"], "intercept": 0.0},
        {"weights": [1.0, 2.0, 3.0, float("nan")], "intercept": 0.0},
        {"weights": [1.0, 2.0, 3.0, 4.0]},
    ],
)
def test_malformed_linear_entries_mean_onnxruntime_for_every_row(
    tmp_path: Path, linear: dict[str, object]
) -> None:
    assert load_model(_model_dir_with(tmp_path, **linear)).linear is None
