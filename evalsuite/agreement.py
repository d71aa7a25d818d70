"""Guard and reviewers agree, or the guard is re-fitted.

Owns the agreement between the guard's decisions and reviewers' verdicts per route and time window
(`agreement_by_window`: the guard "flagged" an answer when it held or blocked it, a reviewer called
it "bad" when they rejected or edited it; the share of items where both say the same, and Cohen's
kappa), the trigger (`needs_refit`) and the re-fit with its gate (`refit_calibration`): a calibration
fitted on the reviewers' labels replaces the current one only if, on the same labelled rows, it
misses no more hallucinations (hallucinated rows whose risk stays below the model's threshold) than
the current one does. Every re-fit, accepted or not, is an `eval_runs` row (kind `calibration`) with
every number, and an `audit_log` row.

Windows are buckets of the request's `created_at` (when the guard decided), `window_s` long.

Imports `core` (db, labels, lifecycle, loop_settings, vocab), `guardrails` (calibration, guard),
scikit-learn, numpy and SQLAlchemy. Flushes, never commits (the calibration file is written when
accepted: write it last, after everything else has succeeded, and commit right after).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.db import EvalMetric, EvalRun, Request, ReviewItem, utcnow
from core.labels import review_rows
from core.lifecycle import audit
from core.loop_settings import LoopSettings
from core.vocab import Decision, EvalKind, EvalStatus, Verdict
from guardrails.calibration import (
    Calibration,
    CalibrationError,
    RiskModel,
    balanced_accuracy,
    feature_vector,
    rows_from_reviews,
)
from guardrails.guard import check_input, run_detectors
from guardrails.types import Detector

FLAGGED = (Decision.HOLD.value, Decision.BLOCK.value)
BAD = (Verdict.REJECT.value, Verdict.EDIT.value)
ACTOR = "loop"
ROUND = 6


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), ROUND)


def kappa(flagged: Sequence[bool], bad: Sequence[bool]) -> float | None:
    """Cohen's kappa of two yes/no raters; None where it is undefined (fewer than one class between
    them, where chance agreement is 1)."""
    from sklearn.metrics import cohen_kappa_score

    if len(flagged) == 0 or len(set(flagged) | set(bad)) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(cohen_kappa_score(list(flagged), list(bad)))
    return _round(value)


@dataclass
class AgreementRow:
    """One (route, window): `agreement` is the share of decided items where guard and reviewer agree;
    `false_alarms` were flagged but approved, `misses` let through but rejected or edited."""

    route: str
    window_start: datetime
    n: int
    agreement: float
    kappa: float | None
    flagged: int
    bad: int
    false_alarms: int
    misses: int

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["window_start"] = self.window_start.isoformat()
        return out


def agreement_by_window(session: Session, route: str | None = None, window_s: float = 86400.0) -> list[AgreementRow]:
    """Agreement of the guard's decisions with the final verdicts of decided review items, per
    (route, window), ordered by route then window. Requests without a guard decision are left out."""
    query = (
        sa.select(Request.route, Request.created_at, Request.decision, ReviewItem.final_verdict)
        .join(Request, Request.id == ReviewItem.request_id)
        .where(ReviewItem.final_verdict.is_not(None), Request.decision.is_not(None))
    )
    if route is not None:
        query = query.where(Request.route == route)
    groups: dict[tuple[str, datetime], list[tuple[bool, bool]]] = {}
    for r, created_at, decision, verdict in session.execute(query):
        start = datetime.fromtimestamp(math.floor(created_at.timestamp() / window_s) * window_s, UTC)
        groups.setdefault((r, start), []).append((decision in FLAGGED, verdict in BAD))
    rows = []
    for (r, start), pairs in sorted(groups.items()):
        flagged = [f for f, _ in pairs]
        bad = [b for _, b in pairs]
        rows.append(AgreementRow(
            route=r, window_start=start, n=len(pairs),
            agreement=_round(sum(f == b for f, b in pairs) / len(pairs)), kappa=kappa(flagged, bad),
            flagged=sum(flagged), bad=sum(bad), false_alarms=sum(f and not b for f, b in pairs),
            misses=sum(b and not f for f, b in pairs),
        ))  # fmt: skip
    return rows


def latest_agreement(rows: Sequence[AgreementRow], settings: LoopSettings) -> dict[str, AgreementRow]:
    """Per route, its latest window with at least `loop.agreement_min_items` decided items."""
    out: dict[str, AgreementRow] = {}
    for row in rows:
        if row.n >= settings.agreement_min_items and (
            row.route not in out or row.window_start > out[row.route].window_start
        ):
            out[row.route] = row
    return out


def needs_refit(rows: Sequence[AgreementRow], settings: LoopSettings) -> bool:
    """Whether some route's latest window with enough items agrees below `loop.agreement_below`."""
    return any(row.agreement < settings.agreement_below for row in latest_agreement(rows, settings).values())


@dataclass
class ModelScore:
    """One risk model on the labelled rows: its threshold, missed hallucinations, balanced accuracy."""

    threshold: float
    misses: int
    false_alarms: int
    balanced_accuracy: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RefitResult:
    """A re-fit and its gate: `accepted` only when the new model misses no more hallucinations."""

    accepted: bool
    reason: str
    rows: int = 0
    hallucinated: int = 0
    current: ModelScore | None = None
    new: ModelScore | None = None
    path: str | None = None  # where the accepted calibration was written
    eval_run_id: int | None = None
    weights: dict[str, float] = field(default_factory=dict)  # the new calibration's

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["current"] = self.current.to_dict() if self.current else None
        out["new"] = self.new.to_dict() if self.new else None
        return out


def score_model(model: RiskModel, results: Sequence[Mapping[str, Any]], labels: np.ndarray) -> ModelScore:
    risks = np.array([model.risk(r) for r in results], dtype=float)
    flagged = risks >= model.threshold
    return ModelScore(
        threshold=_round(model.threshold),
        misses=int((labels & ~flagged).sum()),
        false_alarms=int((~labels & flagged).sum()),
        balanced_accuracy=_round(balanced_accuracy(flagged, labels)),
    )


def _record(session: Session, result: RefitResult, started: datetime, route: str | None) -> None:
    summary = {"route": route, **result.to_dict()}
    run = EvalRun(kind=EvalKind.CALIBRATION, status=EvalStatus.SUCCEEDED, started_at=started, finished_at=utcnow(),
                  summary=summary)  # fmt: skip
    session.add(run)
    for name, score in (("current", result.current), ("new", result.new)):
        if score is not None:
            run.metrics.append(EvalMetric(name=f"{name}.misses", value=float(score.misses), n=result.rows))
            run.metrics.append(EvalMetric(name=f"{name}.balanced_accuracy", value=score.balanced_accuracy,
                                          n=result.rows))  # fmt: skip
    session.flush()
    result.eval_run_id = run.id
    run.summary = {**summary, "eval_run_id": run.id}
    action = "guard.recalibrated" if result.accepted else "guard.recalibration_rejected"
    audit(session, ACTOR, action, "eval_run", run.id, run.summary)
    session.flush()


def refit_calibration(
    session: Session,
    detectors: Mapping[str, Detector],
    current: RiskModel,
    path: str | Path,
    C: float = 1.0,
    route: str | None = None,
) -> RefitResult:
    """Fit a calibration on every decided review (`core.labels.review_rows` ->
    `guardrails.calibration.rows_from_reviews`), gate it against `current` on the same rows, and on
    acceptance write it to `path` atomically. The detectors run once per row; the fit is exactly
    `guardrails.guard.fit_calibration`'s (detector results -> `feature_vector` -> `Calibration.fit`),
    done in its two steps so the gate scores both models on the same results."""
    started = utcnow()
    rows = rows_from_reviews(review_rows(session))
    labels = np.array([bool(r["hallucinated"]) for r in rows], dtype=bool)
    result = RefitResult(accepted=False, reason="", rows=len(rows), hallucinated=int(labels.sum()))
    if not rows or labels.all() or not labels.any():
        result.reason = "the reviews need both approved and rejected or edited answers"
        _record(session, result, started, route)
        return result
    results = [run_detectors(detectors, check_input(r)) for r in rows]
    try:
        fitted = Calibration.fit([feature_vector(r) for r in results], labels.tolist(), C=C, source="reviews")
    except CalibrationError as err:
        result.reason = f"fit failed: {err}"
        _record(session, result, started, route)
        return result
    result.current = score_model(current, results, labels)
    result.new = score_model(fitted, results, labels)
    result.weights = fitted.weights()
    result.accepted = result.new.misses <= result.current.misses
    if result.accepted:
        result.reason = f"misses {result.new.misses} <= current {result.current.misses}"
        result.path = str(path)
    else:
        result.reason = f"misses {result.new.misses} > current {result.current.misses}: kept the current calibration"
    _record(session, result, started, route)
    if result.accepted:
        fitted.save(path)
    return result
