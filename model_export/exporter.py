"""Conversion to ONNX and writing model.onnx + model.json, only once parity has been proven."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import DoubleTensorType

from model_export.parity import parity_fixture, verify_parity
from model_export.training import TrainingResult
from shared.model_contract import (
    FEATURES,
    INPUT_NAME,
    LINEAR_KEY,
    PROBABILITY_OUTPUT,
    contract_metadata,
    contract_mismatch,
    linear_metadata,
)

# Pinned so the graph (and its hash) does not shift with skl2onnx's default; onnxruntime 1.32
# runs both. skl2onnx still stamps the lowest opsets the graph needs (13 / ml 1 for this model).
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
# skl2onnx names the graph with a random uuid unless told otherwise, which made every export's
# bytes (and so its version hash) different.
GRAPH_NAME = "ad_moderation"
SKL2ONNX_PROBABILITY_OUTPUT = "probabilities"
LIBRARIES = ("scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy")
VERSION_HEX_CHARS = 16


class ExportError(Exception):
    """The model could not be converted or written; the message is one line for the user."""


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    json_path: Path
    version: str
    metadata: dict[str, Any]


def _rename_output(model: onnx.ModelProto, old: str, new: str) -> None:
    if old == new:
        return
    names = {output.name for output in model.graph.output}
    if new in names:
        raise ExportError(f"cannot rename ONNX output {old!r}: {new!r} is already an output")
    for output in model.graph.output:
        if output.name == old:
            output.name = new
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


def convert_to_onnx(model: Any) -> bytes:
    """The classifier as ONNX bytes: float64 INPUT_NAME (n, 4) -> PROBABILITY_OUTPUT (n, 2)."""
    onnx_model = convert_sklearn(
        model,
        name=GRAPH_NAME,
        initial_types=[(INPUT_NAME, DoubleTensorType([None, len(FEATURES)]))],
        # zipmap off: a plain (n, 2) tensor instead of a list of {class: probability} dicts.
        options={id(model): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    outputs = [output.name for output in onnx_model.graph.output]
    if SKL2ONNX_PROBABILITY_OUTPUT not in outputs:
        raise ExportError(
            f"skl2onnx produced outputs {outputs}, no {SKL2ONNX_PROBABILITY_OUTPUT!r}"
        )
    _rename_output(onnx_model, SKL2ONNX_PROBABILITY_OUTPUT, PROBABILITY_OUTPUT)
    # skl2onnx emits opset_import in set order, which follows PYTHONHASHSEED: sort it so the
    # bytes (and the version hash) are the same in every process.
    opsets = sorted(onnx_model.opset_import, key=lambda opset: (opset.domain, opset.version))
    del onnx_model.opset_import[:]
    onnx_model.opset_import.extend(opsets)
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model.SerializeToString()


def model_version(onnx_bytes: bytes) -> str:
    """Content hash: the same graph always has the same version, a different one never does."""
    return hashlib.sha256(onnx_bytes).hexdigest()[:VERSION_HEX_CHARS]


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def linear_of(model: Any) -> dict[str, Any] | None:
    """A binary linear classifier's weights for model.json (serving scores single rows with
    them, after checking them against the ONNX graph); None for any other model."""
    coef, intercept = getattr(model, "coef_", None), getattr(model, "intercept_", None)
    classes = list(getattr(model, "classes_", []))
    if coef is None or intercept is None or classes != [0, 1] or coef.shape != (1, len(FEATURES)):
        return None
    return linear_metadata(coef[0], intercept[0])


def build_metadata(
    training: TrainingResult, onnx_bytes: bytes, parity_diff: float
) -> dict[str, Any]:
    metadata = {
        **contract_metadata(),
        "version": model_version(onnx_bytes),
        "threshold": training.threshold,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "training_data": training.training_data,
        "metrics": training.metrics,
        "parity_max_abs_diff": parity_diff,
        "libraries": library_versions(),
        "input_name": INPUT_NAME,
        "output_name": PROBABILITY_OUTPUT,
    }
    linear = linear_of(training.model)
    if linear is not None:
        metadata[LINEAR_KEY] = linear
    mismatch = contract_mismatch(metadata)
    if mismatch is not None:
        raise ExportError(f"metadata does not fit the model contract: {mismatch}")
    return metadata


def _write_all_atomically(files: dict[Path, bytes]) -> None:
    """Each file is either the old one or the complete new one, never partly written.

    Everything is staged in temp files beside the targets first, so the renames that make the
    new model visible happen back to back and a failed write leaves no new file at all.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            fd, temp_name = tempfile.mkstemp(
                dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
            )
            staged.append((temp_name, path))
            # mkstemp creates 0600; the model is meant to be read by the serving user too.
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for temp_name, path in staged:
            os.replace(temp_name, path)
    finally:
        for temp_name, _ in staged:
            Path(temp_name).unlink(missing_ok=True)


def export_model(training: TrainingResult, out_dir: Path) -> ExportResult:
    """Convert, prove parity, then write model.onnx and model.json; on any failure write nothing."""
    onnx_bytes = convert_to_onnx(training.model)
    # Raises ParityError before anything touches the disk.
    diff = verify_parity(training.model, onnx_bytes, parity_fixture(training.X_holdout))
    metadata = build_metadata(training, onnx_bytes, diff)
    metadata_bytes = (json.dumps(metadata, indent=2) + "\n").encode()

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        onnx_path, json_path = out_dir / "model.onnx", out_dir / "model.json"
        _write_all_atomically({onnx_path: onnx_bytes, json_path: metadata_bytes})
    except OSError as exc:
        raise ExportError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
    return ExportResult(onnx_path, json_path, metadata["version"], metadata)
