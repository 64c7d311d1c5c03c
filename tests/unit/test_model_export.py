"""model_export: default training, reference ads, ONNX parity, atomic export, and the CLI."""

from __future__ import annotations

import csv
import hashlib
import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression

from model_export import (
    DataError,
    ParityError,
    TrainingResult,
    convert_to_onnx,
    export_model,
    holdout_metrics,
    parity_fixture,
    synthetic_data,
    train_default,
    verify_parity,
)
from model_export import exporter as exporter_module
from model_export.__main__ import main
from shared.model import load_model
from shared.model_contract import (
    DEFAULT_THRESHOLD,
    FEATURES,
    INPUT_NAME,
    PROBABILITY_OUTPUT,
    contract_mismatch,
    feature_row,
    linear_weights,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
HEADER = ["is_verified_seller", "images_qty", "description", "category", "is_violation"]

# (is_verified_seller, images_qty, description, category) -> expected P(violation) or None
# when only "below the threshold" is expected. Numbers are the original service's.
VIOLATIONS = [
    pytest.param((False, 0, "Test Description", 1), 0.77, id="unverified-0-images"),
    pytest.param((False, 1, "Test Description", 1), 0.64, id="unverified-1-image"),
    pytest.param((False, 1, "Short description", 50), 0.635, id="unverified-1-image-cat50"),
]
NON_VIOLATIONS = [
    pytest.param((True, 8, "Test Description", 75), id="verified-8-images"),
    pytest.param((True, 5, "Test Description", 1), id="verified-5-images"),
]


@pytest.fixture(scope="module")
def default_training() -> TrainingResult:
    return train_default()


@pytest.fixture(scope="module")
def default_onnx(default_training: TrainingResult) -> bytes:
    return convert_to_onnx(default_training.model)


def onnx_violation_probability(onnx_bytes: bytes, ad: tuple[bool, int, str, int]) -> float:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(
        [PROBABILITY_OUTPUT], {INPUT_NAME: np.asarray([feature_row(*ad)], dtype=np.float64)}
    )
    return float(probabilities[0, 1])  # serving reads column 1


def other_model_onnx() -> bytes:
    """A valid ONNX model with the same interface but different weights."""
    data = synthetic_data(seed=1)
    return convert_to_onnx(LogisticRegression(C=0.01).fit(data.X, 1 - data.y))


def write_csv(path: Path, rows: list[list[object]], header: list[str] = HEADER) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def rule_rows(count: int = 300, seed: int = 0) -> list[list[object]]:
    """Ads labelled by a simple rule: unverified sellers with fewer than 3 images violate."""
    rng = np.random.default_rng(seed)
    rows: list[list[object]] = []
    for i in range(count):
        verified = bool(rng.integers(0, 2))
        images = int(rng.integers(0, 11))
        description = "x" * int(rng.integers(0, 500))
        category = int(rng.integers(1, 101))
        violation = not verified and images < 3
        # Mix the accepted spellings of booleans.
        spell = (lambda b: "true" if b else "false") if i % 2 else (lambda b: "1" if b else "0")
        rows.append([spell(verified), images, description, category, spell(violation)])
    return rows


def run_cli(args: list[str]):
    return CliRunner().invoke(main, args)


# --- training ---------------------------------------------------------------------------


def test_synthetic_data_matches_original_global_seed_draw() -> None:
    state = np.random.get_state()
    try:
        np.random.seed(42)
        X = np.random.rand(1000, 4)
    finally:
        np.random.set_state(state)
    data = synthetic_data()
    np.testing.assert_array_equal(data.X, X)
    np.testing.assert_array_equal(data.y, ((X[:, 0] < 0.3) & (X[:, 1] < 0.2)).astype(int))


def test_default_training_is_reproducible(tmp_path: Path) -> None:
    first, second = train_default(), train_default()
    np.testing.assert_array_equal(first.model.coef_, second.model.coef_)
    np.testing.assert_array_equal(first.model.intercept_, second.model.intercept_)
    assert first.metrics == second.metrics

    a = export_model(first, tmp_path / "a")
    b = export_model(second, tmp_path / "b")
    assert a.version == b.version
    assert a.onnx_path.read_bytes() == b.onnx_path.read_bytes()


def test_default_training_fits_all_rows_with_plain_logistic_regression(
    default_training: TrainingResult,
) -> None:
    data = synthetic_data()
    expected = LogisticRegression().fit(data.X, data.y)
    np.testing.assert_array_equal(default_training.model.coef_, expected.coef_)
    assert default_training.training_data["rows"] == 1000
    # The hold-out is a separate draw, not a slice of the training rows.
    assert not np.isin(default_training.X_holdout[:, 0], data.X[:, 0]).any()


def test_shipped_default_model_matches_default_training(default_onnx: bytes) -> None:
    shipped = REPO_ROOT / "shared" / "default_model"
    metadata = json.loads((shipped / "model.json").read_text())
    assert contract_mismatch(metadata) is None
    shipped_onnx = (shipped / "model.onnx").read_bytes()
    assert metadata["version"] == hashlib.sha256(shipped_onnx).hexdigest()[:16]
    # lbfgs ends a few ULPs apart on different CPUs (BLAS kernels), so the coefficients are
    # compared to 1e-12 and everything else in the graph byte for byte.
    shipped_model, fresh_model = (
        onnx.load_from_string(shipped_onnx),
        onnx.load_from_string(default_onnx),
    )
    for shipped_tensor, fresh_tensor in zip(
        shipped_model.graph.initializer, fresh_model.graph.initializer, strict=True
    ):
        np.testing.assert_allclose(
            onnx.numpy_helper.to_array(shipped_tensor),
            onnx.numpy_helper.to_array(fresh_tensor),
            rtol=1e-12,
        )
        fresh_tensor.CopyFrom(shipped_tensor)
    assert fresh_model.SerializeToString() == shipped_onnx
    # Its linear weights are the graph's own (the violation column), bit for bit.
    tensors = {t.name: onnx.numpy_helper.to_array(t) for t in shipped_model.graph.initializer}
    assert linear_weights(metadata) == (
        tuple(tensors["coef"][:, 1].tolist()),
        float(tensors["intercept"].ravel()[1]),
    )
    served = load_model(shipped / "model.onnx")
    assert served.linear == linear_weights(metadata)  # and they passed the check at load


# --- reference ads ----------------------------------------------------------------------


@pytest.mark.parametrize(("ad", "expected"), VIOLATIONS)
def test_reference_violation_sklearn_probability(
    default_training: TrainingResult, ad: tuple[bool, int, str, int], expected: float
) -> None:
    probability = default_training.model.predict_proba([feature_row(*ad)])[0, 1]
    assert probability == pytest.approx(expected, abs=0.01)
    assert probability >= DEFAULT_THRESHOLD


@pytest.mark.parametrize(("ad", "expected"), VIOLATIONS)
def test_reference_violation_onnx_probability(
    default_onnx: bytes, ad: tuple[bool, int, str, int], expected: float
) -> None:
    probability = onnx_violation_probability(default_onnx, ad)
    assert probability == pytest.approx(expected, abs=0.01)
    assert probability >= DEFAULT_THRESHOLD


@pytest.mark.parametrize("ad", NON_VIOLATIONS)
def test_reference_non_violation_sklearn_and_onnx(
    default_training: TrainingResult, default_onnx: bytes, ad: tuple[bool, int, str, int]
) -> None:
    sklearn_probability = default_training.model.predict_proba([feature_row(*ad)])[0, 1]
    assert sklearn_probability < DEFAULT_THRESHOLD
    assert onnx_violation_probability(default_onnx, ad) < DEFAULT_THRESHOLD


# --- ONNX conversion and parity ---------------------------------------------------------


def test_onnx_model_has_contract_input_and_float64_probability_pair(default_onnx: bytes) -> None:
    session = ort.InferenceSession(default_onnx, providers=["CPUExecutionProvider"])
    assert [node.name for node in session.get_inputs()] == [INPUT_NAME]
    assert PROBABILITY_OUTPUT in [node.name for node in session.get_outputs()]
    X = synthetic_data(seed=5, rows=10).X
    (probabilities,) = session.run([PROBABILITY_OUTPUT], {INPUT_NAME: X})
    assert probabilities.shape == (10, 2)
    assert probabilities.dtype == np.float64
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)


def test_verify_parity_accepts_faithful_conversion(
    default_training: TrainingResult, default_onnx: bytes
) -> None:
    fixture = parity_fixture(default_training.X_holdout)
    assert fixture.shape == (len(default_training.X_holdout) + 300 + 5, len(FEATURES))
    diff = verify_parity(default_training.model, default_onnx, fixture)
    assert 0.0 <= diff <= 1e-6


def test_verify_parity_rejects_other_model(default_training: TrainingResult) -> None:
    with pytest.raises(ParityError, match="differ"):
        verify_parity(
            default_training.model, other_model_onnx(), parity_fixture(default_training.X_holdout)
        )


# --- export -----------------------------------------------------------------------------


def test_export_writes_model_and_valid_metadata(tmp_path: Path) -> None:
    result = export_model(train_default(threshold=0.4), tmp_path / "out")
    onnx_bytes = result.onnx_path.read_bytes()
    metadata = json.loads(result.json_path.read_text())

    assert contract_mismatch(metadata) is None
    assert metadata["version"] == result.version == hashlib.sha256(onnx_bytes).hexdigest()[:16]
    assert metadata["threshold"] == 0.4
    assert metadata["metrics"]["threshold"] == 0.4
    assert metadata["input_name"] == INPUT_NAME
    assert metadata["output_name"] == PROBABILITY_OUTPUT
    assert metadata["features"] == list(FEATURES)
    assert metadata["training_data"]["source"] == "synthetic"
    assert metadata["training_data"]["seed"] == 42
    assert 0.0 <= metadata["parity_max_abs_diff"] <= 1e-6
    assert set(metadata["libraries"]) == {
        "scikit-learn",
        "skl2onnx",
        "onnx",
        "onnxruntime",
        "numpy",
    }
    assert all(metadata["libraries"].values())
    # Single rows are scored with these weights once load_model has checked them.
    assert load_model(result.onnx_path).linear == linear_weights(metadata)
    assert metadata["linear"]["weights"] == pytest.approx(
        train_default().model.coef_[0].tolist(), abs=1e-12
    )
    assert datetime.fromisoformat(metadata["created_at"]).utcoffset() == timedelta(0)
    assert metadata["metrics"]["roc_auc"] > 0.9
    # No temp files left behind.
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "model.json",
        "model.onnx",
    ]


def test_export_parity_failure_writes_nothing(
    default_training: TrainingResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = other_model_onnx()
    monkeypatch.setattr(exporter_module, "convert_to_onnx", lambda model: wrong)

    with pytest.raises(ParityError):
        export_model(default_training, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()

    # An existing model is left exactly as it was.
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "model.onnx").write_bytes(b"old model")
    (existing / "model.json").write_text('{"version": "old"}')
    result = run_cli(["--out", str(existing)])
    assert result.exit_code != 0
    assert result.stderr.startswith("error: ONNX and scikit-learn probabilities differ")
    assert (existing / "model.onnx").read_bytes() == b"old model"
    assert (existing / "model.json").read_text() == '{"version": "old"}'
    assert sorted(path.name for path in existing.iterdir()) == ["model.json", "model.onnx"]


def test_holdout_metrics_degenerate_cases_are_none_not_crash() -> None:
    single_class = holdout_metrics(np.zeros(4, dtype=int), np.array([0.1, 0.2, 0.3, 0.4]), 0.5)
    assert single_class["roc_auc"] is None
    assert single_class["recall"] is None  # no positives
    assert single_class["precision"] is None  # nothing flagged

    mixed = holdout_metrics(np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.4, 0.6]), 0.5)
    assert mixed == {
        "rows": 4,
        "positives": 2,
        "threshold": 0.5,
        "roc_auc": 0.75,
        "precision": 0.5,
        "recall": 0.5,
    }


# --- CLI --------------------------------------------------------------------------------


def test_cli_default_prints_metrics_and_version(tmp_path: Path) -> None:
    result = run_cli(["--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    metadata = json.loads((tmp_path / "model.json").read_text())
    assert f"version: {metadata['version']}" in result.stdout
    assert "ROC AUC: " in result.stdout
    assert "precision @ 0.5: " in result.stdout
    assert "hold-out rows: 1000" in result.stdout
    assert str(tmp_path / "model.onnx") in result.stdout


def test_cli_csv_happy_path_trains_and_exports(tmp_path: Path) -> None:
    rows = rule_rows(300)
    # An extra column must be ignored.
    data = write_csv(
        tmp_path / "ads.csv", [[*row, "ignored"] for row in rows], header=[*HEADER, "title"]
    )
    out = tmp_path / "out"

    result = run_cli(["--data", str(data), "--out", str(out), "--threshold", "0.3"])

    assert result.exit_code == 0, result.output
    metadata = json.loads((out / "model.json").read_text())
    assert contract_mismatch(metadata) is None
    assert metadata["threshold"] == 0.3
    training = metadata["training_data"]
    assert training["source"] == "csv"
    assert training["file"] == "ads.csv"
    assert training["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert (training["rows"], training["train_rows"], training["holdout_rows"]) == (300, 240, 60)
    assert metadata["metrics"]["rows"] == 60
    assert metadata["metrics"]["roc_auc"] > 0.9  # the rule is linear in the features
    assert f"version: {metadata['version']}" in result.stdout


def test_cli_csv_split_seed_changes_split(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "ads.csv", rule_rows(200))
    versions = set()
    for seed in ("1", "2"):
        result = run_cli(["--data", str(data), "--out", str(tmp_path / seed), "--split-seed", seed])
        assert result.exit_code == 0, result.output
        versions.add(json.loads((tmp_path / seed / "model.json").read_text())["version"])
    assert len(versions) == 2


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(
            "is_verified_seller,images_qty,description,is_violation\ntrue,1,a,false\n",
            "missing column(s) category",
            id="missing-column",
        ),
        pytest.param(
            "is_verified_seller,images_qty,description,category,is_violation\n"
            "true,1,a,5,false\nfalse,two,b,5,true\n",
            "line 3, column images_qty: 'two'",
            id="wrong-type",
        ),
        pytest.param(
            "is_verified_seller,images_qty,description,category,is_violation\nmaybe,1,a,5,false\n",
            "line 2, column is_verified_seller: 'maybe'",
            id="bad-boolean",
        ),
        pytest.param(
            "is_verified_seller,images_qty,description,category,is_violation\ntrue,-3,a,5,false\n",
            "line 2, column images_qty: '-3'",
            id="negative-images",
        ),
        pytest.param("", "is empty", id="empty-file"),
        pytest.param(
            "is_verified_seller,images_qty,description,category,is_violation\n",
            "no data rows",
            id="header-only",
        ),
        pytest.param(
            "is_verified_seller,images_qty,description,category,is_violation\n"
            + "true,5,a,5,false\n" * 20,
            "only one label class",
            id="single-class",
        ),
    ],
)
def test_cli_bad_csv_fails_with_one_line_error(tmp_path: Path, content: str, expected: str) -> None:
    data = tmp_path / "ads.csv"
    data.write_text(content)
    out = tmp_path / "out"

    result = run_cli(["--data", str(data), "--out", str(out)])

    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)  # handled, not a crash
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert expected in lines[0]
    assert not out.exists()


def test_cli_nonexistent_file_fails_with_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    result = run_cli(["--data", str(missing), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert result.stderr.strip() == f"error: file not found: {missing}"
    assert not (tmp_path / "out").exists()


def test_load_csv_error_is_data_error(tmp_path: Path) -> None:
    from model_export import load_csv

    with pytest.raises(DataError, match="file not found"):
        load_csv(tmp_path / "absent.csv")
