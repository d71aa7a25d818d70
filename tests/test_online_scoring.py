"""Online scoring on both backends: the stable sample, one score per exchange (risk, flags, errors, the
reviewer's verdict, the gold answer, the judge), no double scoring by re-runs or racing workers,
verdicts decided later, and the per-window summaries."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from core.db import Adapter, OnlineScore, Request, ReviewItem
from core.loop_settings import LoopSettings
from evalsuite.scoring import (
    current_quality,
    insert_scores,
    refresh_verdicts,
    sampled,
    score_new_traffic,
    window_quality,
    window_start,
)

ROUTE = "support"
NOW = datetime(2025, 3, 4, 12, 0, 0, tzinfo=UTC)
GOLD = {"what is the standing charge of t417?": "12.40 EUR per month."}


def add_request(session: Session, i: int, **kw) -> Request:
    question = kw.pop("question", f"Question number {i}?")
    row = Request(
        id=kw.pop("id", f"{i:032x}"),
        created_at=kw.pop("created_at", NOW - timedelta(seconds=600 - i)),
        route=kw.pop("route", ROUTE),
        endpoint=kw.pop("endpoint", "chat"),
        status_code=kw.pop("status_code", 200),
        request_json={"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]},
        answer_text=kw.pop("answer", "An answer."),
        risk=kw.pop("risk", 0.1),
        decision=kw.pop("decision", "allow"),
        latency_ms=kw.pop("latency_ms", 100.0 + i),
        **kw,
    )
    session.add(row)
    return row


def decide(session: Session, request_id: str, verdict: str, decision_at: datetime = NOW) -> None:
    session.add(ReviewItem(request_id=request_id, reason="held", status="decided", final_verdict=verdict,
                           decided_at=decision_at, created_at=decision_at))  # fmt: skip


def test_the_sample_is_stable_and_near_the_rate() -> None:
    ids = [f"{i:032x}" for i in range(4000)]
    share = sum(sampled(i, 0.2) for i in ids) / len(ids)
    assert 0.17 < share < 0.23
    assert [sampled(i, 0.2) for i in ids] == [sampled(i, 0.2) for i in ids]
    assert not any(sampled(i, 0.0) for i in ids[:50]) and all(sampled(i, 1.0) for i in ids[:50])
    assert window_start(datetime(2025, 3, 4, 12, 7, 31, tzinfo=UTC), 300) == datetime(2025, 3, 4, 12, 5, tzinfo=UTC)


def test_each_exchange_is_scored_with_everything_known_about_it(db_sessions: sessionmaker[Session]) -> None:
    settings = LoopSettings(score_sample_rate=1.0, window_s=300)
    with db_sessions.begin() as s:
        s.add(Adapter(id=7, name="support", version=2, base_model_hash="h"))
        s.flush()
        add_request(s, 1, question="What is the standing charge of T417?", answer="12.40 eur per month")  # gold right
        add_request(s, 2, question="What is the standing charge of T417?", answer="10 EUR.", adapter_id=7)  # gold wrong
        add_request(s, 3, decision="hold", risk=0.8)  # held, approved by a reviewer
        decide(s, f"{3:032x}", "approve")
        add_request(s, 4, risk=0.3)  # let through, rejected by a reviewer: an override
        decide(s, f"{4:032x}", "reject")
        add_request(s, 5, status_code=502, answer=None, decision=None, risk=None)  # upstream error
        add_request(s, 6, answer="I think so.")  # judged only
        add_request(s, 7, endpoint="embeddings")  # not an exchange we score
        add_request(s, 8, created_at=NOW - timedelta(days=3))  # older than the lookback
    judge = lambda q, a: 0.9 if a == "I think so." else 0.2  # noqa: E731
    with db_sessions.begin() as s:
        batch = score_new_traffic(s, settings, GOLD, judge=judge, now=NOW)
    assert batch.to_dict() == {"examined": 6, "sampled": 6, "inserted": 6, "duplicates": 0, "with_gold": 2,
                               "reviewed": 2, "judged": 5, "judge_errors": 0}  # fmt: skip
    with db_sessions() as s:
        scores = {int(x.request_id, 16): x for x in s.scalars(sa.select(OnlineScore))}
    assert set(scores) == {1, 2, 3, 4, 5, 6}
    assert (scores[1].gold_correct, scores[1].correct, scores[1].adapter_version) == (True, True, "base")
    assert (scores[2].gold_correct, scores[2].correct, scores[2].adapter_version) == (False, False, "support/v2")
    assert scores[2].adapter_id == 7
    assert (scores[3].flagged, scores[3].verdict, scores[3].overridden, scores[3].correct) == (
        True,
        "approve",
        None,
        True,
    )
    assert (scores[4].flagged, scores[4].verdict, scores[4].overridden, scores[4].correct) == (
        False,
        "reject",
        True,
        False,
    )
    assert scores[5].error and scores[5].risk is None and scores[5].correct is None and scores[5].judge_score is None
    assert (scores[6].judge_score, scores[6].correct, scores[6].verdict, scores[6].overridden) == (
        0.9,
        True,
        None,
        None,
    )
    assert all(not scores[i].error for i in (1, 2, 3, 4, 6))
    assert scores[1].window_start == window_start(NOW - timedelta(seconds=599), 300)
    assert scores[4].risk == 0.3 and scores[4].latency_ms == 104.0
    with db_sessions.begin() as s:  # a re-run finds nothing new
        again = score_new_traffic(s, settings, GOLD, judge=judge, now=NOW)
    assert (again.examined, again.inserted) == (0, 0)


def test_only_the_stable_sample_is_scored_and_never_twice(db_sessions: sessionmaker[Session]) -> None:
    settings = LoopSettings(score_sample_rate=0.3)
    with db_sessions.begin() as s:
        ids = [add_request(s, i, created_at=NOW - timedelta(seconds=i)).id for i in range(200)]
    with db_sessions.begin() as s:
        first = score_new_traffic(s, settings, {}, now=NOW, limit=20)
    with db_sessions.begin() as s:
        rest = score_new_traffic(s, settings, {}, now=NOW)
    with db_sessions.begin() as s:
        third = score_new_traffic(s, settings, {}, now=NOW)
    expected = {i for i in ids if sampled(i, 0.3)}
    with db_sessions() as s:
        scored = list(s.scalars(sa.select(OnlineScore.request_id)))
    assert sorted(scored) == sorted(expected) and len(scored) == len(set(scored))
    assert first.inserted == 20 and first.inserted + rest.inserted == len(expected) and third.inserted == 0
    assert 30 < len(expected) < 90


def test_duplicates_are_skipped_and_racing_workers_score_each_exchange_once(db_sessions: sessionmaker[Session]) -> None:
    settings = LoopSettings(score_sample_rate=1.0)
    with db_sessions.begin() as s:
        for i in range(60):
            add_request(s, i)
    row = {"request_id": f"{0:032x}", "route": ROUTE, "adapter_id": None, "adapter_version": "base",
           "window_start": NOW, "risk": 0.1, "flagged": False, "error": False}  # fmt: skip
    with db_sessions.begin() as s:
        assert insert_scores(s, [row]) == 1
    with db_sessions.begin() as s:
        assert insert_scores(s, [row, {**row, "request_id": f"{1:032x}"}]) == 1
    results, errors = [], []
    barrier = threading.Barrier(2)

    def worker() -> None:
        try:
            barrier.wait()
            with db_sessions.begin() as s:
                results.append(score_new_traffic(s, settings, {}, now=NOW))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    with db_sessions() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(OnlineScore)) == 60
    assert sum(r.inserted for r in results) == 58


def test_a_verdict_decided_later_reaches_the_score(db_sessions: sessionmaker[Session]) -> None:
    settings = LoopSettings(score_sample_rate=1.0)
    with db_sessions.begin() as s:
        add_request(s, 1, risk=0.4)  # let through
        add_request(s, 2, decision="hold", risk=0.9)
        add_request(s, 3, question="What is the standing charge of T417?", answer="12.40 EUR per month")
        for i in (1, 2, 3):
            s.add(ReviewItem(request_id=f"{i:032x}", reason="sampled", status="pending"))
    with db_sessions.begin() as s:
        score_new_traffic(s, settings, GOLD, now=NOW)
    with db_sessions.begin() as s:
        for item in s.scalars(sa.select(ReviewItem)):
            item.status, item.final_verdict, item.decided_at = "decided", "edit", NOW
    with db_sessions.begin() as s:
        assert refresh_verdicts(s) == 3
    with db_sessions.begin() as s:
        assert refresh_verdicts(s) == 0
        scores = {int(x.request_id, 16): x for x in s.scalars(sa.select(OnlineScore))}
    assert (scores[1].verdict, scores[1].overridden, scores[1].correct) == ("edit", True, False)
    assert (scores[2].verdict, scores[2].overridden, scores[2].correct) == ("edit", None, False)
    assert (scores[3].verdict, scores[3].gold_correct, scores[3].correct) == ("edit", True, True)  # gold wins


def test_window_quality_and_current_quality(db_sessions: sessionmaker[Session]) -> None:
    w0 = datetime(2025, 3, 4, 11, 0, tzinfo=UTC)
    w1 = w0 + timedelta(seconds=300)

    def score(i: int, window: datetime, version: str = "base", **kw) -> OnlineScore:
        base = {"risk": 0.2, "flagged": False, "error": False, "latency_ms": float(i)}
        return OnlineScore(request_id=f"{i:032x}", route=ROUTE, adapter_version=version, window_start=window,
                           **{**base, **kw})  # fmt: skip

    with db_sessions.begin() as s:
        for i in range(1, 21):
            add_request(s, i)
        s.flush()
        s.add_all([
            score(1, w0, correct=True, overridden=False), score(2, w0, correct=False, overridden=True),
            score(3, w0, correct=True, flagged=True), score(4, w0, error=True, risk=None, latency_ms=None),
            score(5, w1, correct=True), score(6, w1, correct=True, risk=0.6),
            score(7, w1, "support/v2", correct=False, flagged=True),
        ])  # fmt: skip
    with db_sessions() as s:
        rows = window_quality(s, ROUTE)
        later = window_quality(s, since=w1)
        other = window_quality(s, "billing")
        summary = current_quality(s, ROUTE, "base", last_n=3)
    assert [(r.window_start, r.adapter_version) for r in rows] == [(w0, "base"), (w1, "base"), (w1, "support/v2")]
    first = rows[0].to_dict()
    assert first == {"route": ROUTE, "adapter_version": "base", "window_start": w0.isoformat(), "n": 4,
                     "judged": 3, "quality": round(2 / 3, 6), "flag_rate": 0.25, "reviewed": 2,
                     "override_rate": 0.5, "error_rate": 0.25, "mean_risk": 0.2,
                     "p95_latency_ms": 2.9}  # fmt: skip
    assert rows[2].quality == 0.0 and rows[2].flag_rate == 1.0 and rows[2].override_rate is None
    assert len(later) == 2 and other == []
    assert summary.n == 3 and summary.window_start == w0 and summary.quality == 1.0  # scores 4 (unjudged), 5, 6
    assert summary.mean_risk == 0.4 and summary.to_dict()["window_start"] == w0.isoformat()


def test_loop_metrics_export_the_latest_window_and_what_the_worker_sets(db_sessions: sessionmaker[Session]) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from evalsuite.metrics import LoopMetrics

    settings = LoopSettings(window_s=300)
    now = datetime(2025, 3, 4, 12, 0, tzinfo=UTC)
    old, new = now - timedelta(minutes=20), now - timedelta(minutes=5)
    with db_sessions.begin() as s:
        for i in range(1, 9):
            add_request(s, i)
        s.flush()
        rows = [
            (1, old, "base", {"correct": False}),  # an older window: not exported
            (2, new, "base", {"correct": True, "overridden": False}),
            (3, new, "base", {"correct": False, "flagged": True, "overridden": True}),
            (4, new, "base", {"error": True}),
            (5, new, "base", {"correct": True}),
            (6, new, "support/v2", {"correct": True}),
            (7, now - timedelta(days=3), "support/v1", {"correct": True}),  # gone quiet
        ]
        for i, window, version, kw in rows:
            s.add(OnlineScore(request_id=f"{i:032x}", route=ROUTE, adapter_version=version, window_start=window,
                              **{"flagged": False, "error": False, **kw}))  # fmt: skip
    metrics = LoopMetrics()
    with db_sessions() as s:
        used = metrics.update_from_db(s, settings, now=now)
    assert sorted(r.adapter_version for r in used) == ["base", "support/v2"]
    metrics.set_drift(ROUTE, 0.81, True, 0.12)
    metrics.set_agreement(ROUTE, 0.9)
    metrics.set_canary(ROUTE, "support/v2", 0.5)
    metrics.canary_rolled_back(ROUTE, "support/v3")
    metrics.set_review_budget_left(ROUTE, 17)
    metrics.set_adapter_status(ROUTE, "support/v2", "gated")
    metrics.set_adapter_status(ROUTE, "support/v2", "canary")
    metrics.job_finished("score", "succeeded", at=1700000000.0)
    metrics.job_finished("score", "succeeded", at=1700000060.0)
    text = generate_latest(metrics.registry).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    base = (("adapter_version", "base"), ("route", ROUTE))
    v2 = (("adapter_version", "support/v2"), ("route", ROUTE))
    assert samples[("tunegate_quality", base)] == pytest.approx(2 / 3)
    assert samples[("tunegate_flag_rate", base)] == 0.25
    assert samples[("tunegate_override_rate", base)] == 0.5
    assert samples[("tunegate_error_rate", base)] == 0.25
    assert samples[("tunegate_quality", v2)] == 1.0 and ("tunegate_override_rate", v2) not in samples
    assert not any(dict(labels).get("adapter_version") == "support/v1" for _, labels in samples)
    assert samples[("tunegate_drift_auroc", (("route", ROUTE),))] == 0.81
    assert samples[("tunegate_drift_detected", (("route", ROUTE),))] == 1.0
    assert samples[("tunegate_risk_drift_statistic", (("route", ROUTE),))] == 0.12
    assert samples[("tunegate_guard_agreement", (("route", ROUTE),))] == 0.9
    assert samples[("tunegate_canary_weight", v2)] == 0.5
    assert samples[("tunegate_canary_weight", (("adapter_version", "support/v3"), ("route", ROUTE)))] == -1.0
    assert samples[("tunegate_review_budget_left", (("route", ROUTE),))] == 17
    assert samples[("tunegate_adapter_status", (*v2[:1], ("route", ROUTE), ("status", "canary")))] == 1.0
    assert ("tunegate_adapter_status", (*v2[:1], ("route", ROUTE), ("status", "gated"))) not in samples
    assert samples[("tunegate_loop_jobs_total", (("kind", "score"), ("result", "succeeded")))] == 2.0
    assert samples[("tunegate_loop_last_run_timestamp_seconds", (("kind", "score"),))] == 1700000060.0
    assert 'tunegate_quality{adapter_version="support/v2",route="support"} 1.0' in text
