"""CLI: ``python -m model_export [--data ads.csv] [--out model/] [--threshold 0.5]``."""

from __future__ import annotations

from pathlib import Path

import click

from model_export.data import DataError
from model_export.exporter import ExportError, export_model
from model_export.parity import ParityError
from model_export.training import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_TEST_SIZE,
    train_default,
    train_from_csv,
)
from shared.model_contract import DEFAULT_THRESHOLD


def _format(value: float | None) -> str:
    return "n/a (undefined on this hold-out)" if value is None else f"{value:.4f}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data",
    type=click.Path(dir_okay=True, path_type=Path),
    default=None,
    help="Labelled CSV (is_verified_seller, images_qty, description, category, is_violation). "
    "Without it, the original synthetic training set is used.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("model"),
    show_default=True,
    help="Directory for model.onnx and model.json.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=DEFAULT_THRESHOLD,
    show_default=True,
    help="Violation threshold on P(violation), for the metrics and model.json.",
)
@click.option(
    "--test-size",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=DEFAULT_TEST_SIZE,
    show_default=True,
    help="Hold-out fraction of the CSV rows (stratified). CSV only.",
)
@click.option(
    "--split-seed",
    type=int,
    default=DEFAULT_SPLIT_SEED,
    show_default=True,
    help="random_state of the train/hold-out split. CSV only.",
)
def main(data: Path | None, out: Path, threshold: float, test_size: float, split_seed: int) -> None:
    """Train the ad-moderation model, check ONNX parity, and write model.onnx + model.json."""
    try:
        if data is None:
            training = train_default(threshold)
            click.echo("training: synthetic default (seed 42, 1000 rows)")
        else:
            training = train_from_csv(data, threshold, test_size, split_seed)
            info = training.training_data
            click.echo(
                f"training: {info['file']} ({info['train_rows']} train rows, "
                f"{info['holdout_rows']} hold-out rows)"
            )
        metrics = training.metrics
        click.echo(f"hold-out rows: {metrics['rows']} ({metrics['positives']} violations)")
        click.echo(f"ROC AUC: {_format(metrics['roc_auc'])}")
        click.echo(f"precision @ {threshold:g}: {_format(metrics['precision'])}")
        click.echo(f"recall @ {threshold:g}: {_format(metrics['recall'])}")
        result = export_model(training, out)
    except (DataError, ExportError, ParityError) as exc:
        # One line, no traceback: these are problems with the input, not bugs in the tool.
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    click.echo(f"parity max abs diff: {result.metadata['parity_max_abs_diff']:.3g}")
    click.echo(f"wrote {result.onnx_path} and {result.json_path}")
    click.echo(f"version: {result.version}")


if __name__ == "__main__":
    main()
