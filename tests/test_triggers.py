"""evalsuite.triggers on a migrated SQLite database: when a route retrains, what blocks it, and the
content-hashed snapshot a training job carries."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from core.db import (
    Adapter,
    AuditLog,
    Job,
    Rollout,
    enqueue,
    session_scope,
    utcnow,
)
from core.io import sha256_text
from core.lifecycle import set_paused
from core.loop_settings import LoopSettings, TriggerSettings
from core.vocab import AdapterStatus, DatasetKind, JobStatus, RolloutStatus
from evalsuite import testsets, triggers

from .helpers import add_reviewed

ROUTE = "support"
SETTINGS = LoopSettings(
    holdout_size=1,
    test_share=0.25,
    replay_rows=4,
    trigger=TriggerSettings(min_new_labels=3, min_scored_for_quality=30, quality_below=0.7, cooldown_s=3600,
                            max_per_day=2),
)  # fmt: skip


@pytest.fixture
def factory(sqlite_db_sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    return sqlite_db_sessions


_counter = iter(range(10**6))


def add_labels(session: Session, n: int, route: str = ROUTE, test: int = 0) -> None:
    """`n` reviewed labels that land on the training side (and `test` on the test side), assigned."""
    if not testsets.items(session, route, DatasetKind.HOLDOUT):
        add_reviewed(session, f"Holdout question of {route}?", "The holdout answer.", route)
    wanted = {False: n, True: test}
    while any(wanted.values()):
        q = f"What is the unit rate of tariff T{next(_counter):05d}?"
        side = testsets._test_side(q, SETTINGS.test_share)
        if wanted[side]:
            wanted[side] -= 1
            add_reviewed(session, q, "12 cents per kWh.", route)
    testsets.assign_reviewed(session, route, SETTINGS)


def train_job(session: Session, status: JobStatus = JobStatus.SUCCEEDED, ago_s: float = 7200, route: str = ROUTE,
              result: dict | None = None) -> Job:  # fmt: skip
    job = enqueue(session, triggers.TRAIN_JOB, {"route": route})
    job.status, job.created_at, job.result = status, utcnow() - timedelta(seconds=ago_s), result
    session.flush()
    return job


def test_fires_on_enough_new_labels_not_below(factory) -> None:
    with session_scope(factory) as s:
        add_labels(s, 2, test=3)  # test-side labels do not count
        d = triggers.decide(s, ROUTE, SETTINGS)
        assert not d.fire and d.reasons == [] and d.new_labels == 2 and d.blocked_by is None
        add_labels(s, 1)
        d = triggers.decide(s, ROUTE, SETTINGS)
        assert d.fire and d.new_labels == 3 and d.blocked_by is None
        assert d.reasons == ["3 new reviewed training labels (>= 3)"]
        assert not triggers.decide(s, "billing", SETTINGS).fire  # another route has none


def test_labels_count_from_the_last_training(factory) -> None:
    with session_scope(factory) as s:
        add_labels(s, 5)
        train_job(s, ago_s=0)  # a training now: the five are behind it
        d = triggers.decide(s, ROUTE, SETTINGS, now=utcnow() + timedelta(hours=2))
        assert d.new_labels == 0 and not d.fire and d.last_training is not None
        add_labels(s, 3)
        d = triggers.decide(s, ROUTE, SETTINGS, now=utcnow() + timedelta(hours=2))
        assert d.new_labels == 3 and d.fire


def test_quality_needs_enough_scored_exchanges(factory) -> None:
    with session_scope(factory) as s:
        add_labels(s, 1)
        assert not triggers.decide(s, ROUTE, SETTINGS, quality=0.5, scored=29).fire
        assert not triggers.decide(s, ROUTE, SETTINGS, quality=0.7, scored=100).fire
        d = triggers.decide(s, ROUTE, SETTINGS, quality=0.5, scored=30)
        assert d.fire and d.reasons == ["online quality 0.500 < 0.7 on 30 exchanges"]


def test_drift(factory) -> None:
    with session_scope(factory) as s:
        d = triggers.decide(s, ROUTE, SETTINGS, drifted=True)
        assert not d.fire and d.reasons == ["the route's inputs drifted"]
        assert d.blocked_by == "no reviewed labels to learn from"
        add_labels(s, 1)
        assert triggers.decide(s, ROUTE, SETTINGS, drifted=True).fire
        off = SETTINGS.model_copy(update={"trigger": SETTINGS.trigger.model_copy(update={"on_drift": False})})
        assert not triggers.decide(s, ROUTE, off, drifted=True).fire


def test_blocked_by_pause(factory) -> None:
    with session_scope(factory) as s:
        add_labels(s, 3)
        set_paused(s, ROUTE, True, "ops", "investigating")
        d = triggers.decide(s, ROUTE, SETTINGS)
        assert not d.fire and d.blocked_by == "the loop is paused for this route" and d.reasons
        set_paused(s, "billing", True, "ops")
        set_paused(s, ROUTE, False, "ops")
        assert triggers.decide(s, ROUTE, SETTINGS).fire


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.RUNNING])
def test_blocked_by_a_training_job_in_flight(factory, status: JobStatus) -> None:
    with session_scope(factory) as s:
        train_job(s, status=status, route="billing")  # another route's job does not block
        add_labels(s, 3)
        assert triggers.decide(s, ROUTE, SETTINGS).fire
        train_job(s, status=status, ago_s=86400 * 2)
        add_labels(s, 3)
        d = triggers.decide(s, ROUTE, SETTINGS)
        assert not d.fire and d.blocked_by == "a training job of the route is queued or running"
        enqueue(s, "score", {"route": ROUTE})  # other kinds do not count


def test_blocked_by_a_running_canary(factory) -> None:
    with session_scope(factory) as s:
        add_labels(s, 3)
        cand = Adapter(name=ROUTE, version=2, base_model_hash="b", status=AdapterStatus.CANARY)
        s.add(cand)
        s.flush()
        rollout = Rollout(route=ROUTE, candidate_id=cand.id, weights=[0.1, 1.0])
        s.add(rollout)
        s.flush()
        d = triggers.decide(s, ROUTE, SETTINGS)
        assert not d.fire and d.blocked_by == "a canary of the route is running"
        rollout.status = RolloutStatus.PROMOTED
        s.flush()
        assert triggers.decide(s, ROUTE, SETTINGS).fire


def test_blocked_by_a_candidate_waiting_for_the_gate(factory) -> None:
    with session_scope(factory) as s:
        cand = Adapter(name=ROUTE, version=2, base_model_hash="b", status=AdapterStatus.CANDIDATE)
        s.add(cand)
        s.flush()
        train_job(s, result={"adapter_id": cand.id})
        add_labels(s, 3)
        d = triggers.decide(s, ROUTE, SETTINGS)
        assert not d.fire and d.blocked_by == "a candidate of the route is waiting for the gate"
        cand.status = AdapterStatus.REJECTED
        s.flush()
        assert triggers.decide(s, ROUTE, SETTINGS).fire


def test_blocked_by_cooldown_and_daily_cap(factory) -> None:
    with session_scope(factory) as s:
        train_job(s, ago_s=600)
        add_labels(s, 3)
        d = triggers.decide(s, ROUTE, SETTINGS)
        assert not d.fire and d.blocked_by.startswith("cool-down: last training 6")
        assert triggers.decide(s, ROUTE, SETTINGS, now=utcnow() + timedelta(seconds=3601)).fire
    no_cooldown = SETTINGS.model_copy(update={"trigger": SETTINGS.trigger.model_copy(update={"cooldown_s": 0})})
    with session_scope(factory) as s:
        train_job(s, ago_s=1)  # the second training of the UTC day (cap 2)
        add_labels(s, 3)
        now = utcnow()
        d = triggers.decide(s, ROUTE, no_cooldown, now=now)
        if now - timedelta(seconds=601) >= now.replace(hour=0, minute=0, second=0, microsecond=0):
            assert not d.fire and d.blocked_by == "daily cap of 2 trainings reached"
        # The next UTC day the cap starts again.
        tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=1)
        assert triggers.decide(s, ROUTE, no_cooldown, now=tomorrow).fire


def test_snapshot_rows_and_counts(factory) -> None:
    replay = [{"messages": [{"role": "user", "content": f"replay {k}"}, {"role": "assistant", "content": "r"}],
               "extra": k} for k in range(10)]  # fmt: skip
    curated = [{"messages": [{"role": "user", "content": f"curated {k}"}, {"role": "assistant", "content": "c"}]}
               for k in range(2)]  # fmt: skip
    with session_scope(factory) as s:
        add_labels(s, 5, test=2)
        labels = testsets.training_labels(s, ROUTE)
        rows, counts = triggers.snapshot_rows(s, ROUTE, replay, curated, SETTINGS)
        assert counts == {"reviewed_labels": 5, "replay": 4, "curated": 2} and len(rows) == 11
        assert all(set(r) == {"messages"} for r in rows)
        contents = [r["messages"][0]["content"] for r in rows]
        for label in labels:
            assert {"messages": label["messages"]} in rows
        assert sum(c.startswith("replay ") for c in contents) == 4
        assert {"curated 0", "curated 1"} <= set(contents)
        tests = {i.question for i in testsets.items(s, ROUTE, DatasetKind.TEST)}
        holdout = {i.question for i in testsets.items(s, ROUTE, DatasetKind.HOLDOUT)}
        assert not (tests | holdout) & set(contents)
        again, _ = triggers.snapshot_rows(s, ROUTE, replay, curated, SETTINGS)
        assert again == rows  # seeded
        many = SETTINGS.model_copy(update={"replay_rows": 50})
        _, counts = triggers.snapshot_rows(s, ROUTE, replay, [], many)
        assert counts == {"reviewed_labels": 5, "replay": 10, "curated": 0}
        _, counts = triggers.snapshot_rows(s, ROUTE, [], [], SETTINGS)
        assert counts == {"reviewed_labels": 5, "replay": 0, "curated": 0}


def test_file_training_job(factory, tmp_path: Path) -> None:
    snapshots = tmp_path / "var" / "loop" / "snapshots"  # not there yet: filing creates it
    replay = [{"messages": [{"role": "user", "content": f"replay {k}"}, {"role": "assistant", "content": "r"}]}
              for k in range(6)]  # fmt: skip
    with session_scope(factory) as s:
        add_labels(s, 3)
        d = triggers.decide(s, ROUTE, SETTINGS)
        assert d.fire
        rows, counts = triggers.snapshot_rows(s, ROUTE, replay, [], SETTINGS)
        job = triggers.file_training_job(s, d, rows, counts, snapshots)
        job_id, payload = job.id, dict(job.payload)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    assert payload["content_hash"] == sha256_text(text)
    assert payload["route"] == ROUTE and payload["rows"] == 7 and payload["counts"] == counts
    assert payload["reasons"] == d.reasons
    path = Path(payload["snapshot"])
    assert path.parent == snapshots and payload["content_hash"][:16] in path.name and path.name.startswith(ROUTE)
    assert path.read_text() == text
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    with session_scope(factory) as s:
        job = s.get(Job, job_id)
        assert job.kind == "train" and job.status == JobStatus.QUEUED
        (row,) = s.scalars(sa.select(AuditLog).where(AuditLog.action == "loop.trigger")).all()
        assert row.object_type == "route" and row.object_id == ROUTE
        assert row.detail["job_id"] == job_id and row.detail["content_hash"] == payload["content_hash"]
        # The job now blocks the next trigger; the same rows give the same file and hash.
        d2 = triggers.decide(s, ROUTE, SETTINGS, quality=0.1, scored=100)
        assert d2.new_labels == 0 and not d2.fire
        assert d2.blocked_by == "a training job of the route is queued or running"
        assert triggers.training_jobs(s, ROUTE)[0].id == job_id
        same_rows, _ = triggers.snapshot_rows(s, ROUTE, replay, [], SETTINGS)
        again = triggers.file_training_job(s, d, same_rows, counts, snapshots)
        assert again.id != job_id
        assert again.payload["content_hash"] == payload["content_hash"] and again.payload["snapshot"] == str(path)
    assert sorted(p.name for p in snapshots.iterdir()) == [path.name]
