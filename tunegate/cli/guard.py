"""`tunegate guard calibrate`: fit the guardrail's calibrated risk on labelled rows or reviewers' verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunegate.cli.common import ConfigOption, JsonOption, emit, fail, settings_or_exit, with_session

guard_app = typer.Typer(no_args_is_help=True, help="The hallucination guardrail: calibrate its risk.")


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
        "unseen": calibration.unseen,
        "dropped": calibration.dropped,
    }
    emit(summary, json_out)
