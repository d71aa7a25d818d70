"""Guard-reviewer agreement per route and window, the re-fit trigger, and the gated re-fit of the
calibration from reviews (grounding detector only: CPU-light)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from core.db import AuditLog, EvalRun, Request, ReviewItem, make_engine, migrate, session_factory
from core.loop_settings import LoopSettings
from evalsuite.agreement import agreement_by_window, kappa, needs_refit, refit_calibration
from guardrails.calibration import Calibration
from guardrails.detectors.grounding import grounding

ROUTE = "support"
DAY = datetime(2025, 3, 4, tzinfo=UTC)
CONTEXT = (
    "Tariff T417 is offered in the Northvale region. Tariff T417 has a monthly standing charge of 12.40 EUR. "
    "Energy on tariff T417 costs 0.213 EUR/kWh. Tariff T417 has a minimum contract term of 12 months."
)
SUPPORTED = [
    "Tariff T417 is offered in the Northvale region.",
    "The monthly standing charge of T417 is 12.40 EUR.",
    "Energy on tariff T417 costs 0.213 EUR/kWh.",
    "Tariff T417 has a minimum contract term of 12 months.",
]
HALLUCINATED = [
    "Tariff T417 is offered in the Westmark region.",
    "The monthly standing charge of T417 is 19.99 EUR.",
    "Energy on tariff T417 costs 0.450 EUR/kWh.",
    "Tariff T417 has a minimum contract term of 36 months.",
]


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path}/t.db"
    migrate.upgrade(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def reviewed(session: Session, n: int, decision: str, verdict: str, at: datetime, route: str = ROUTE,
             answer: str = "An answer.", corrected: str | None = None) -> None:  # fmt: skip
    for _ in range(n):
        request = Request(route=route, endpoint="chat", created_at=at, decision=decision, answer_text=answer,
                          request_json={"messages": [{"role": "user", "content": "Tell me about tariff T417."}]},
                          guardrail_scores={"context": CONTEXT})  # fmt: skip
        session.add(request)
        session.flush()
        session.add(ReviewItem(request_id=request.id, reason="held", status="decided", final_verdict=verdict,
                               final_answer=corrected, decided_at=at, created_at=at))  # fmt: skip


def test_kappa_is_none_where_undefined() -> None:
    assert kappa([], []) is None and kappa([True, True], [True, True]) is None
    assert kappa([True, False], [True, False]) == 1.0
    assert kappa([True, False, True, False], [False, True, False, True]) == -1.0


def test_agreement_per_route_and_window_and_the_trigger(factory) -> None:
    with factory.begin() as s:
        # day 1: 30 items, 27 agree (kappa high)
        reviewed(s, 12, "hold", "reject", DAY + timedelta(hours=1))
        reviewed(s, 15, "allow", "approve", DAY + timedelta(hours=2))
        reviewed(s, 2, "hold", "approve", DAY + timedelta(hours=3))  # false alarms
        reviewed(s, 1, "annotate", "edit", DAY + timedelta(hours=4), corrected="Fixed.")  # a miss
        # day 2: 30 items, 18 agree
        reviewed(s, 10, "block", "reject", DAY + timedelta(days=1, hours=1))
        reviewed(s, 8, "allow", "approve", DAY + timedelta(days=1, hours=2))
        reviewed(s, 12, "allow", "reject", DAY + timedelta(days=1, hours=3))
        # day 3: too few to judge
        reviewed(s, 3, "allow", "reject", DAY + timedelta(days=2))
        reviewed(s, 5, "allow", "approve", DAY + timedelta(hours=5), route="billing")
        pending = Request(route=ROUTE, endpoint="chat", created_at=DAY, decision="allow")
        s.add(pending)
        s.flush()
        s.add(ReviewItem(request_id=pending.id, reason="sampled", status="pending"))
    with factory() as s:
        rows = agreement_by_window(s, ROUTE)
        everything = agreement_by_window(s)
        hourly = agreement_by_window(s, ROUTE, window_s=3600)
    assert [(r.window_start, r.n) for r in rows] == [
        (DAY, 30),
        (DAY + timedelta(days=1), 30),
        (DAY + timedelta(days=2), 3),
    ]
    first = rows[0].to_dict()
    assert first == {"route": ROUTE, "window_start": DAY.isoformat(), "n": 30, "agreement": 0.9,
                     "kappa": first["kappa"], "flagged": 14, "bad": 13, "false_alarms": 2, "misses": 1}  # fmt: skip
    assert 0.75 < first["kappa"] < 0.85
    assert rows[1].agreement == 0.6 and rows[1].misses == 12 and rows[2].kappa == 0.0
    assert {r.route for r in everything} == {ROUTE, "billing"} and len(hourly) == 8
    settings = LoopSettings(agreement_below=0.8, agreement_min_items=30)
    assert needs_refit(rows, settings)  # day 2 is the latest with 30 items
    assert not needs_refit(rows[:1], settings)
    assert not needs_refit(rows, LoopSettings(agreement_below=0.5, agreement_min_items=30))
    assert not needs_refit(rows[1:], LoopSettings(agreement_below=0.8, agreement_min_items=31))


def labelled_reviews(session: Session) -> None:
    at = DAY
    for k in range(5):
        for answer in SUPPORTED:
            reviewed(session, 1, "allow", "approve", at + timedelta(minutes=k), answer=answer)
        for answer in HALLUCINATED:
            reviewed(session, 1, "hold", "reject", at + timedelta(minutes=k), answer=answer)
    reviewed(session, 1, "hold", "edit", at, answer=HALLUCINATED[1], corrected=SUPPORTED[1])
    # reviewers reject two well-grounded answers for other reasons (tone): no risk model catches them
    reviewed(session, 2, "allow", "reject", at, answer=SUPPORTED[2])


def fixed(threshold: float) -> Calibration:
    """A hand-set calibration on the grounding score alone."""
    return Calibration(["grounding"], [0.5], [0.0, 0.0], [1.0, 1.0], [4.0, 0.0], -2.0, threshold)


def test_a_refit_that_misses_fewer_hallucinations_is_saved_and_recorded(factory, tmp_path: Path) -> None:
    with factory.begin() as s:
        labelled_reviews(s)
    path = tmp_path / "guardrails" / "calibration.json"
    with factory.begin() as s:
        result = refit_calibration(s, {"grounding": grounding}, fixed(0.99), path, route=ROUTE)
    assert result.accepted, result.reason
    assert (result.rows, result.hallucinated) == (44, 23)  # 41 reviews, the edit's correction, 2 tone rejects
    assert result.current.misses == 23 and result.new.misses <= 3
    assert result.new.balanced_accuracy > result.current.balanced_accuracy
    saved = Calibration.load(path)
    assert saved.trained_on["source"] == "reviews" and round(saved.threshold, 6) == result.new.threshold
    assert result.path == str(path) and "grounding" in result.weights
    with factory() as s:
        run = s.get(EvalRun, result.eval_run_id)
        assert (run.kind, run.status) == ("calibration", "succeeded")
        assert run.summary["accepted"] and run.summary["new"]["misses"] == result.new.misses
        assert run.summary["current"]["balanced_accuracy"] == result.current.balanced_accuracy
        assert {m.name for m in run.metrics} == {"current.misses", "current.balanced_accuracy", "new.misses",
                                                 "new.balanced_accuracy"}  # fmt: skip
        [entry] = s.scalars(sa.select(AuditLog).where(AuditLog.object_type == "eval_run")).all()
        assert (entry.actor, entry.action, entry.object_id) == ("loop", "guard.recalibrated", str(run.id))


def test_a_refit_that_misses_more_is_refused_and_the_file_is_untouched(factory, tmp_path: Path) -> None:
    with factory.begin() as s:
        labelled_reviews(s)
    path = tmp_path / "calibration.json"
    path.write_text("the current file")
    with factory.begin() as s:
        result = refit_calibration(s, {"grounding": grounding}, fixed(0.0), path)  # flags everything
    assert not result.accepted and result.current.misses == 0 and result.new.misses > 0
    assert path.read_text() == "the current file" and result.path is None
    with factory() as s:
        run = s.get(EvalRun, result.eval_run_id)
        assert run.summary["accepted"] is False and "kept the current" in run.summary["reason"]
        assert s.scalar(sa.select(AuditLog.action).where(AuditLog.object_type == "eval_run")) == (
            "guard.recalibration_rejected"
        )


def test_no_refit_without_both_kinds_of_label(factory, tmp_path: Path) -> None:
    with factory.begin() as s:
        reviewed(s, 5, "allow", "approve", DAY, answer=SUPPORTED[0])
    with factory.begin() as s:
        result = refit_calibration(s, {"grounding": grounding}, fixed(0.5), tmp_path / "c.json")
    assert not result.accepted and result.new is None and "both" in result.reason
    assert not (tmp_path / "c.json").exists() and result.eval_run_id is not None
