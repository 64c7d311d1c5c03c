"""Train the ad-moderation model and export it to ONNX with its model.json (ML engineers only).

Run it as ``python -m model_export``; serving never imports this package (it needs scikit-learn).
"""

from model_export.data import DataError, LabelledData, load_csv, synthetic_data
from model_export.exporter import ExportError, ExportResult, convert_to_onnx, export_model
from model_export.parity import PARITY_TOLERANCE, ParityError, parity_fixture, verify_parity
from model_export.training import TrainingResult, holdout_metrics, train_default, train_from_csv

__all__ = [
    "PARITY_TOLERANCE",
    "DataError",
    "ExportError",
    "ExportResult",
    "LabelledData",
    "ParityError",
    "TrainingResult",
    "convert_to_onnx",
    "export_model",
    "holdout_metrics",
    "load_csv",
    "parity_fixture",
    "synthetic_data",
    "train_default",
    "train_from_csv",
    "verify_parity",
]
