"""Canary rollouts (`evalsuite.canary`) on synthetic traffic: steps, promotion, automatic rollback,
waiting for enough requests, repeated failures, reviewer overrides, and two workers judging at once.

The main tests run on SQLite and on PostgreSQL (127.0.0.1:5432, or `TUNEGATE_TEST_POSTGRES_URL`).
Traffic is deterministic (values cycle), so the statistics never fail a step by chance.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from core.db import Adapter, Alias, AliasTarget, AuditLog, Request, ReviewItem, Rollout, migrate
from core.db.session import make_engine, session_factory, session_scope
from core.lifecycle import LifecycleError, route_table
from core.loop_settings import CanarySettings
from evalsuite import canary

from .conftest import reset_postgres_schema

ROUTE = "support"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
LOW_RISK = [0.05 + 0.02 * (i % 10) for i in range(10)]  # 0.05 .. 0.23
HIGH_RISK = [0.6 + 0.03 * (i % 10) for i in range(10)]  # 0.60 .. 0.87
LATENCY = [80.0 + 5 * (i % 10) for i in range(10)]  # 80 .. 125 ms


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tunegate.db'}"


def make_factory(url: str) -> Iterator[sessionmaker[Session]]:
    migrate.upgrade(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def postgres_factory(postgres_database: str) -> Iterator[sessionmaker[Session]]:
    reset_postgres_schema(postgres_database)
    yield from make_factory(postgres_database)


@pytest.fixture
def sqlite_factory(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    yield from make_factory(sqlite_url)


def seed(factory: sessionmaker[Session], base_model: bool = False) -> tuple[int | None, int]:
    """The route serving v1 (or the base model) and a gated v2; returns (baseline id, candidate id)."""
    with session_scope(factory) as session:
        v1 = None if base_model else Adapter(name=ROUTE, version=1, base_model_hash="h", status="active")
        v2 = Adapter(name=ROUTE, version=2, base_model_hash="h", status="gated")
        session.add_all([a for a in (v1, v2) if a is not None])
        session.flush()
        session.add(Alias(name=ROUTE, targets=[AliasTarget(adapter_id=v1.id if v1 else None, weight=1.0)]))
        session.flush()
        return (v1.id if v1 else None), v2.id


def start(factory: sessionmaker[Session], settings: CanarySettings, base_model: bool = False):
    baseline_id, candidate_id = seed(factory, base_model)
    with session_scope(factory) as session:
        rollout = canary.start_rollout(
            session, ROUTE, session.get(Adapter, candidate_id), settings, evidence={"gate": 7}, now=T0
        )
        return rollout.id, baseline_id, candidate_id


def traffic(
    factory: sessionmaker[Session], adapter_id: int | None, n: int, at: datetime, risks=LOW_RISK,
    latencies=LATENCY, decision: str = "allow", status_codes=(200,), verdicts=(),
) -> list[str]:  # fmt: skip
    """`n` requests of one arm from `at` on (one a second), values cycling; a review item per verdict."""
    ids = []
    with session_scope(factory) as session:
        for i in range(n):
            row = Request(route=ROUTE, adapter_id=adapter_id, endpoint="chat.completions",
                          created_at=at + timedelta(seconds=i), risk=risks[i % len(risks)], decision=decision,
                          status_code=status_codes[i % len(status_codes)],
                          latency_ms=latencies[i % len(latencies)])  # fmt: skip
            session.add(row)
            session.flush()
            ids.append(row.id)
            if verdicts and verdicts[i % len(verdicts)] is not None:
                session.add(ReviewItem(request_id=row.id, reason="sampled", status="decided",
                                       final_verdict=verdicts[i % len(verdicts)]))  # fmt: skip
    return ids


def weights(session: Session) -> dict[int | None, float]:
    return {t.adapter_id: t.weight for t in route_table(session)[ROUTE]}


def actions(session: Session) -> list[str]:
    return list(session.scalars(sa.select(AuditLog.action).order_by(AuditLog.id)))


def advance(factory: sessionmaker[Session], rollout_id: int, settings: CanarySettings, now: datetime) -> str:
    with session_scope(factory) as session:
        return canary.advance(session, session.get(Rollout, rollout_id), settings, now=now)


def test_steps_10_50_100_promote_and_retire_the_old_active(db_sessions: sessionmaker[Session]) -> None:
    settings = CanarySettings(steps=[0.1, 0.5, 1.0], step_requests=50)
    rollout_id, v1, v2 = start(db_sessions, settings)
    with db_sessions() as session:
        assert session.get(Adapter, v2).status == "canary"
        assert weights(session) == {v1: pytest.approx(0.9), v2: pytest.approx(0.1)}
        assert canary.canary_state(session.get(Rollout, rollout_id)) == pytest.approx(0.1)
        assert [r.id for r in canary.running_rollouts(session)] == [rollout_id]

    traffic(db_sessions, v2, 50, T0 + timedelta(seconds=1))
    traffic(db_sessions, v1, 450, T0 + timedelta(seconds=1))
    assert advance(db_sessions, rollout_id, settings, T0 + HOUR) == "next_step"
    with db_sessions() as session:
        rollout = session.get(Rollout, rollout_id)
        assert (rollout.step, rollout.step_started_at, canary.canary_state(rollout)) == (1, T0 + HOUR, 0.5)
        assert weights(session) == {v1: 0.5, v2: 0.5}

    traffic(db_sessions, v2, 60, T0 + HOUR + timedelta(seconds=1))
    traffic(db_sessions, v1, 60, T0 + HOUR + timedelta(seconds=1))
    assert advance(db_sessions, rollout_id, settings, T0 + 2 * HOUR) == "next_step"
    with db_sessions() as session:
        assert weights(session) == {v1: 0.0, v2: 1.0}
        window = canary.step_window(session, session.get(Rollout, rollout_id), until=T0 + 2 * HOUR)
        assert (window.canary.n, window.active.n) == (0, 510)  # the active arm: since the rollout began

    # At 100 % the active arm is the old version's traffic since the rollout began.
    traffic(db_sessions, v2, 50, T0 + 2 * HOUR + timedelta(seconds=1))
    assert advance(db_sessions, rollout_id, settings, T0 + 3 * HOUR) == "promoted"
    with db_sessions() as session:
        rollout = session.get(Rollout, rollout_id)
        assert (rollout.status, rollout.finished_at, canary.canary_state(rollout)) == ("promoted", T0 + 3 * HOUR, 1.0)
        assert [(h["step"], h["weight"], h["passed"]) for h in rollout.history] == [
            (0, 0.1, True), (1, 0.5, True), (2, 1.0, True)]  # fmt: skip
        assert rollout.history[-1]["comparisons"]["window"]["active"]["n"] == 510
        assert session.get(Adapter, v2).status == "active"
        assert session.get(Adapter, v1).status == "retired"
        assert weights(session) == {v2: 1.0}
        assert canary.running_rollouts(session) == []
        assert actions(session) == [
            "adapter.canary", "route.weights", "rollout.started",
            "route.weights", "rollout.next_step",
            "route.weights", "rollout.next_step",
            "adapter.active", "adapter.retired", "route.weights", "rollout.promoted",
        ]  # fmt: skip
        canary_row = session.scalar(sa.select(AuditLog).where(AuditLog.action == "adapter.canary"))
        assert canary_row.detail["evidence"] == {"gate": 7}
        promoted = session.scalar(sa.select(AuditLog).where(AuditLog.action == "adapter.active"))
        assert promoted.detail["evidence"]["comparisons"]["risk"]["p_value"] > 0.01
    assert advance(db_sessions, rollout_id, settings, T0 + 4 * HOUR) == "wait"  # finished: nothing more


def test_a_promotion_over_the_base_model_retires_the_base(sqlite_factory: sessionmaker[Session]) -> None:
    settings = CanarySettings(steps=[0.5, 1.0], step_requests=20)
    rollout_id, base, v2 = start(sqlite_factory, settings, base_model=True)
    assert base is None
    traffic(sqlite_factory, None, 20, T0 + timedelta(seconds=1))
    traffic(sqlite_factory, v2, 20, T0 + timedelta(seconds=1))
    assert advance(sqlite_factory, rollout_id, settings, T0 + HOUR) == "next_step"
    traffic(sqlite_factory, v2, 20, T0 + HOUR + timedelta(seconds=1))
    assert advance(sqlite_factory, rollout_id, settings, T0 + 2 * HOUR) == "promoted"
    with sqlite_factory() as session:
        assert weights(session) == {v2: 1.0}
        assert "route.base_retired" in actions(session)
        assert session.get(Adapter, v2).status == "active"


def test_a_riskier_canary_rolls_back_by_itself(db_sessions: sessionmaker[Session]) -> None:
    settings = CanarySettings(step_requests=50)
    rollout_id, v1, v2 = start(db_sessions, settings)
    traffic(db_sessions, v2, 50, T0 + timedelta(seconds=1), risks=HIGH_RISK)
    traffic(db_sessions, v1, 450, T0 + timedelta(seconds=1))
    assert advance(db_sessions, rollout_id, settings, T0 + HOUR) == "rolled_back"
    with db_sessions() as session:
        rollout = session.get(Rollout, rollout_id)
        assert (rollout.status, rollout.failures, canary.canary_state(rollout)) == ("rolled_back", 1, -1.0)
        assert session.get(Adapter, v2).status == "rolled_back"
        assert session.get(Adapter, v1).status == "active"
        assert weights(session) == {v1: 1.0}  # the candidate's target is dropped
        assert canary.running_rollouts(session) == []
        row = session.scalar(sa.select(AuditLog).where(AuditLog.action == "adapter.rolled_back"))
        risk = row.detail["evidence"]["comparisons"]["risk"]
        assert risk["p_value"] < 0.01 and risk["canary_mean"] > risk["active_mean"]
        assert row.detail["evidence"]["reasons"][0].startswith("risk:")
        assert actions(session)[-3:] == ["route.weights", "adapter.rolled_back", "rollout.rolled_back"]


@pytest.mark.parametrize("fault", ["errors", "latency", "holds"])
def test_errors_latency_and_holds_fail_a_step(sqlite_factory: sessionmaker[Session], fault: str) -> None:
    settings = CanarySettings(step_requests=100, max_latency_ratio=1.5)
    rollout_id, v1, v2 = start(sqlite_factory, settings)
    bad = {
        "errors": {"status_codes": (200, 200, 200, 503)},
        "latency": {"latencies": [x * 2 for x in LATENCY]},
        "holds": {"decision": "hold"},
    }[fault]
    traffic(sqlite_factory, v2, 100, T0 + timedelta(seconds=1), **bad)
    traffic(sqlite_factory, v1, 400, T0 + timedelta(seconds=1))
    assert advance(sqlite_factory, rollout_id, settings, T0 + HOUR) == "rolled_back"
    with sqlite_factory() as session:
        entry = session.get(Rollout, rollout_id).history[-1]
        expected = {"errors": "error rate", "latency": "latency", "holds": "hold rate"}[fault]
        assert [r.split(":")[0] for r in entry["reasons"]] == [expected]
        assert entry["comparisons"]["latency"]["checked"] is True
        if fault == "latency":
            assert entry["comparisons"]["latency"]["p95_ratio"] > 1.5


def test_a_step_waits_for_enough_canary_requests(sqlite_factory: sessionmaker[Session]) -> None:
    settings = CanarySettings(step_requests=50, step_seconds=600)
    rollout_id, v1, v2 = start(sqlite_factory, settings)
    assert advance(sqlite_factory, rollout_id, settings, T0 + HOUR) == "wait"  # no canary traffic at all
    traffic(sqlite_factory, v2, 5, T0 + timedelta(seconds=1))
    traffic(sqlite_factory, v1, 45, T0 + timedelta(seconds=1))
    assert advance(sqlite_factory, rollout_id, settings, T0 + timedelta(seconds=300)) == "wait"
    assert advance(sqlite_factory, rollout_id, settings, T0 + timedelta(seconds=700)) == "wait"  # 5 < 10
    with sqlite_factory() as session:
        rollout = session.get(Rollout, rollout_id)
        judgement = canary.judge_step(canary.step_window(session, rollout, T0 + timedelta(seconds=700)), settings)
        assert judgement.passed is None and "needs 10" in judgement.reasons[0]
        assert (rollout.step, rollout.history, weights(session)[v2]) == (0, [], 0.1)
    traffic(sqlite_factory, v2, 7, T0 + timedelta(seconds=100))
    assert advance(sqlite_factory, rollout_id, settings, T0 + timedelta(seconds=300)) == "wait"  # 12 of 50
    assert advance(sqlite_factory, rollout_id, settings, T0 + timedelta(seconds=700)) == "next_step"  # timed


def test_two_failures_allowed_gives_a_failed_step_then_a_rollback(db_sessions: sessionmaker[Session]) -> None:
    settings = CanarySettings(step_requests=50, max_failures=2)
    rollout_id, v1, v2 = start(db_sessions, settings)
    traffic(db_sessions, v2, 50, T0 + timedelta(seconds=1), risks=HIGH_RISK)
    traffic(db_sessions, v1, 200, T0 + timedelta(seconds=1))
    assert advance(db_sessions, rollout_id, settings, T0 + HOUR) == "failed_step"
    with db_sessions() as session:
        rollout = session.get(Rollout, rollout_id)
        assert (rollout.status, rollout.step, rollout.failures, rollout.step_started_at) == ("running", 0, 1, T0 + HOUR)
        assert session.get(Adapter, v2).status == "canary"
        assert weights(session) == {v1: pytest.approx(0.9), v2: pytest.approx(0.1)}
        assert actions(session)[-1] == "rollout.failed_step"
    # The step restarts with a fresh window: the failed traffic is not judged again.
    assert advance(db_sessions, rollout_id, settings, T0 + HOUR + timedelta(seconds=1)) == "wait"
    traffic(db_sessions, v2, 50, T0 + HOUR + timedelta(seconds=1), risks=HIGH_RISK)
    traffic(db_sessions, v1, 200, T0 + HOUR + timedelta(seconds=1))
    assert advance(db_sessions, rollout_id, settings, T0 + 2 * HOUR) == "rolled_back"
    with db_sessions() as session:
        rollout = session.get(Rollout, rollout_id)
        assert (rollout.status, rollout.failures, len(rollout.history)) == ("rolled_back", 2, 2)
        assert weights(session) == {v1: 1.0}


def test_reviewer_overrides_are_counted_per_arm_and_fail_a_step(db_sessions: sessionmaker[Session]) -> None:
    settings = CanarySettings(step_requests=60)
    rollout_id, v1, v2 = start(db_sessions, settings)
    at = T0 + timedelta(seconds=1)
    # Canary: 60 let through, 40 of them reviewed, 20 of those rejected or edited.
    traffic(db_sessions, v2, 60, at, verdicts=("reject", "approve", None, "edit", "approve", None))
    # Held answers a reviewer rejects are not overrides: the guard already stopped them.
    traffic(db_sessions, v2, 10, at, decision="hold", verdicts=("reject",))
    traffic(db_sessions, v1, 300, at, verdicts=("approve", None))
    request_id = traffic(db_sessions, v2, 1, at)[0]
    with session_scope(db_sessions) as session:  # an undecided review item counts for nothing
        session.add(ReviewItem(request_id=request_id, reason="sampled", status="pending"))
    with db_sessions() as session:
        window = canary.step_window(session, session.get(Rollout, rollout_id), until=T0 + HOUR)
        assert (window.canary.n, window.canary.reviewed, window.canary.overridden) == (71, 40, 20)
        assert (window.active.n, window.active.reviewed, window.active.overridden) == (300, 150, 0)
        assert window.canary.held == 10
        judgement = canary.judge_step(window, settings)
        assert judgement.passed is False
        assert any(r.startswith("override rate") for r in judgement.reasons)
        assert judgement.comparisons["override_rate"]["canary_rate"] == 0.5
    assert advance(db_sessions, rollout_id, settings, T0 + HOUR) == "rolled_back"


def test_start_refuses_a_candidate_that_is_not_gated_and_a_second_rollout(db_sessions: sessionmaker[Session]) -> None:
    settings = CanarySettings()
    with session_scope(db_sessions) as session:
        v3 = Adapter(name=ROUTE, version=3, base_model_hash="h", status="candidate")
        session.add(v3)
    seed(db_sessions)
    with session_scope(db_sessions) as session:
        v3 = session.scalar(sa.select(Adapter).where(Adapter.version == 3))
        with pytest.raises(LifecycleError, match="only a gated version"):
            canary.start_rollout(session, ROUTE, v3, settings)
        v3.status = "gated"
        v2 = session.scalar(sa.select(Adapter).where(Adapter.version == 2))
        canary.start_rollout(session, ROUTE, v2, settings)
    with session_scope(db_sessions) as session:
        v3 = session.scalar(sa.select(Adapter).where(Adapter.version == 3))
        with pytest.raises(LifecycleError, match="already has a running rollout"):
            canary.start_rollout(session, ROUTE, v3, settings)
        with pytest.raises(LifecycleError, match="not in the database"):
            canary.start_rollout(session, "nowhere", v3, settings)
    with db_sessions() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Rollout)) == 1
        assert session.scalar(sa.select(Adapter.status).where(Adapter.version == 3)) == "gated"


@pytest.mark.postgres
def test_two_workers_advancing_at_once_apply_one_step_once(postgres_factory: sessionmaker[Session]) -> None:
    factory = postgres_factory
    settings = CanarySettings(step_requests=50)
    rollout_id, v1, v2 = start(factory, settings)
    traffic(factory, v2, 50, T0 + timedelta(seconds=1))
    traffic(factory, v1, 450, T0 + timedelta(seconds=1))
    together = threading.Barrier(2)
    outcomes: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with session_scope(factory) as session:
                rollout = session.get(Rollout, rollout_id)  # both read step 0 before either judges
                together.wait()
                outcomes.append(canary.advance(session, rollout, settings, now=T0 + HOUR))
                time.sleep(0.2)  # hold the lock open: the other worker meets it
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert sorted(outcomes) == ["next_step", "wait"]
    with factory() as session:
        rollout = session.get(Rollout, rollout_id)
        assert (rollout.step, len(rollout.history)) == (1, 1)
        assert actions(session).count("rollout.next_step") == 1
        assert weights(session) == {v1: 0.5, v2: 0.5}


def test_a_stale_judgement_is_dropped_by_the_compare_and_set(
    sqlite_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite has no row locks: a worker whose step another worker judged meanwhile changes nothing."""
    settings = CanarySettings(step_requests=50)
    rollout_id, v1, v2 = start(sqlite_factory, settings)
    traffic(sqlite_factory, v2, 50, T0 + timedelta(seconds=1))
    traffic(sqlite_factory, v1, 450, T0 + timedelta(seconds=1))
    real_window = canary.step_window

    def window_then_race(session, rollout, until=None):
        window = real_window(session, rollout, until)
        monkeypatch.setattr(canary, "step_window", real_window)
        assert advance(sqlite_factory, rollout_id, settings, T0 + HOUR) == "next_step"  # the other worker
        return window

    monkeypatch.setattr(canary, "step_window", window_then_race)
    assert advance(sqlite_factory, rollout_id, settings, T0 + HOUR) == "wait"
    with sqlite_factory() as session:
        rollout = session.get(Rollout, rollout_id)
        assert (rollout.step, len(rollout.history)) == (1, 1)
        assert actions(session).count("rollout.next_step") == 1
