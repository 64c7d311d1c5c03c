"""Training data: the original synthetic set, and labelled ads read from a CSV file."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from shared.model_contract import FEATURES, feature_row

# The original service trained on exactly this; changing any of it changes the shipped model.
SYNTHETIC_SEED = 42
SYNTHETIC_ROWS = 1000
# A different seed, so hold-out metrics never touch the rows the default model was fitted on.
SYNTHETIC_HOLDOUT_SEED = 43
SYNTHETIC_RULE = "X = rand(rows, 4); is_violation = (X[:, 0] < 0.3) & (X[:, 1] < 0.2)"

REQUIRED_COLUMNS = ("is_verified_seller", "images_qty", "description", "category", "is_violation")


class DataError(Exception):
    """Training data that cannot be used; the message is one line meant for the user."""


@dataclass(frozen=True)
class LabelledData:
    """Feature matrix (contract order) and 0/1 labels, plus where they came from."""

    X: np.ndarray
    y: np.ndarray
    source: str  # "synthetic" or "csv"
    file_name: str | None = None
    sha256: str | None = None

    @property
    def rows(self) -> int:
        return len(self.y)


def synthetic_data(seed: int = SYNTHETIC_SEED, rows: int = SYNTHETIC_ROWS) -> LabelledData:
    """The original synthetic set: uniform scaled features, violation iff the first two are low.

    RandomState(seed).rand draws the same numbers as np.random.seed(seed); np.random.rand,
    without touching the global generator.
    """
    X = np.random.RandomState(seed).rand(rows, len(FEATURES))
    y = ((X[:, 0] < 0.3) & (X[:, 1] < 0.2)).astype(int)
    return LabelledData(X=X, y=y, source="synthetic")


def _parse_flag(value: object) -> object:
    # Stricter than pydantic's lax bool ("yes", "on", "t"...): the data format says true/false/1/0.
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1"):
            return True
        if text in ("false", "0"):
            return False
        raise ValueError("expected true, false, 1 or 0")
    return value


Flag = Annotated[bool, BeforeValidator(_parse_flag)]


class LabelledAd(BaseModel):
    """One CSV row: the ad fields the model reads and its label."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    is_verified_seller: Flag
    images_qty: int = Field(ge=0)
    description: str
    category: int
    is_violation: Flag


def _first_error(name: str, line: int, row: dict[str, str], error: ValidationError) -> str:
    detail = error.errors()[0]
    column = str(detail["loc"][0]) if detail["loc"] else "?"
    message = detail["msg"].removeprefix("Value error, ")
    return f"{name} line {line}, column {column}: {row.get(column)!r}: {message}"


def load_csv(path: Path) -> LabelledData:
    """Read and validate a labelled CSV of ads; raises DataError with a one-line reason."""
    name = path.name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not a CSV file") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        # utf-8-sig: spreadsheets often prepend a BOM, which would corrupt the first header name.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name} is not UTF-8 text (byte {exc.start})") from None

    reader = csv.DictReader(text.splitlines(keepends=True))
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        raise DataError(f"{name} line 1: malformed CSV header: {exc}") from None
    if not header:
        raise DataError(f"{name} is empty: no header row and no data rows")
    # Tolerate padding around header names ("images_qty ,"), a common hand-edit artefact.
    reader.fieldnames = [column.strip() for column in header]
    missing = [column for column in REQUIRED_COLUMNS if column not in reader.fieldnames]
    if missing:
        raise DataError(
            f"{name} is missing column(s) {', '.join(missing)} "
            f"(header has: {', '.join(reader.fieldnames)})"
        )

    features: list[list[float]] = []
    labels: list[int] = []
    try:
        for row in reader:
            line = reader.line_num
            if all(not (value or "").strip() for key, value in row.items() if key is not None):
                continue  # blank lines are not data
            absent = [column for column in REQUIRED_COLUMNS if row.get(column) is None]
            if absent:
                raise DataError(f"{name} line {line}, column {absent[0]}: value is missing")
            try:
                ad = LabelledAd.model_validate({column: row[column] for column in REQUIRED_COLUMNS})
            except ValidationError as exc:
                raise DataError(_first_error(name, line, row, exc)) from None
            features.append(
                feature_row(ad.is_verified_seller, ad.images_qty, ad.description, ad.category)
            )
            labels.append(int(ad.is_violation))
    except csv.Error as exc:
        raise DataError(f"{name} line {reader.line_num}: malformed CSV: {exc}") from None

    if not labels:
        raise DataError(f"{name} has a header but no data rows")
    y = np.asarray(labels, dtype=int)
    classes = set(labels)
    if len(classes) < 2:
        only = "true" if classes == {1} else "false"
        raise DataError(
            f"{name} has only one label class (is_violation is always {only}); "
            "training needs both violations and non-violations"
        )
    return LabelledData(
        X=np.asarray(features, dtype=np.float64).reshape(-1, len(FEATURES)),
        y=y,
        source="csv",
        file_name=name,
        sha256=hashlib.sha256(raw).hexdigest(),
    )
