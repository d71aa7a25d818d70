"""`tunegate guard calibrate`: fit the guardrail's calibrated risk on labelled rows or reviewers' verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunegate.cli.common import ConfigOption, JsonOption, console, emit, fail, settings_or_exit, with_session

guard_app = typer.Typer(
    no_args_is_help=True, help="The hallucination guardrail: calibrate its risk, train its grounding model."
)


@guard_app.command("calibrate")
def guard_calibrate(
    data: Annotated[
        Path | None, typer.Option(help="Labelled JSONL: {knowledge, question, answer, hallucinated} a line.")
    ] = None,
    from_reviews: Annotated[
        bool, typer.Option("--from-reviews", help="Add the review queue's verdicts as labels (with --data or alone).")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Where to write it (default: `guardrails.calibration_path`).")
    ] = None,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Fit the calibrated risk (logistic regression over the detectors' scores) on labelled rows."""
    from guardrails.calibration import CalibrationError, read_labelled
    from guardrails.guard import calibration_path_for, fit_calibration
    from guardrails.registry import RegistryError, build_detectors

    settings = settings_or_exit(config)
    if data is None and not from_reviews:
        raise fail("give `--data LABELLED.jsonl`, `--from-reviews`, or both")
    if data is not None and not data.exists():
        raise fail(f"`--data` {data} not found")
    try:
        rows = read_labelled(data) if data is not None else []
        if from_reviews:
            from core.labels import review_rows
            from guardrails.calibration import rows_from_reviews

            with with_session(settings) as session:
                rows += rows_from_reviews(review_rows(session))
        source = " + ".join([str(data)] * (data is not None) + ["review queue"] * from_reviews)
        calibration = fit_calibration(rows, build_detectors(settings.guardrails), source=source)
    except (CalibrationError, RegistryError) as err:
        raise fail(str(err)) from None
    path = calibration.save(out or calibration_path_for(settings.guardrails, settings.var_dir))
    summary = {
        "path": str(path),
        **calibration.trained_on,
        "threshold": round(calibration.threshold, 4),
        "weights": calibration.weights(),
        # Answers longer than `length_range` content words are scored by these weights (README).
        "transfer_weights": calibration.transfer.weights() if calibration.transfer else None,
        "unseen": calibration.unseen,
        "dropped": calibration.dropped,
    }
    emit(summary, json_out)


@guard_app.command("train-detector")
def guard_train_detector(
    data_dir: Annotated[
        Path | None, typer.Option(help="The shared data folder (default: $TUNEGATE_DATA_DIR or ../shared/data).")
    ] = None,
    rows_per_source: Annotated[
        int | None, typer.Option(help="Cap every source at this many rows (a quick, smaller model).")
    ] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the training mix (default: the recipe's).")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Train again even if the cache has this model.")] = False,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Train the learned grounding detector on the shared training folders (never the dev sets), or reuse
    the cached one (`<var_dir>/models/grounding-<hash of data, recipe, base weights>`)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from guardrails.calibration import CalibrationError
    from guardrails.grounding_model import Recipe
    from guardrails.grounding_training import DEFAULT_ROWS, default_data_dir, train_detector

    settings = settings_or_exit(config)
    folder = data_dir or default_data_dir()
    if not folder.is_dir():
        raise fail(f"`--data-dir` {folder} is not a folder; point it at the shared data (its README lists the sets)")
    if rows_per_source is not None and rows_per_source < 1:
        raise fail("`--rows-per-source` must be at least 1")
    caps = {source: rows_per_source for source in DEFAULT_ROWS} if rows_per_source else {}
    try:
        recipe = Recipe(rows_per_source=caps, **({"epochs": epochs} if epochs is not None else {}))
    except ValueError as err:
        raise fail(str(err)) from None
    columns = (
        TextColumn("training the grounding model"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=json_out) as bar:
        task = bar.add_task("train", total=None, loss=0.0)
        try:
            result = train_detector(
                settings.models_dir,
                folder,
                recipe,
                rebuild=rebuild,
                progress=lambda step, steps, loss: bar.update(task, completed=step, total=steps, loss=loss),
            )
        except (FileNotFoundError, CalibrationError, ValueError) as err:
            raise fail(str(err)) from None
    result.pop("trained_on", None)
    emit(result, json_out)
