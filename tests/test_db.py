"""The database layer on both backends: migrations, the schema against the models, constraints, and
the jobs queue (including two workers racing for jobs).

PostgreSQL is the server on 127.0.0.1:5432 (`TUNEGATE_TEST_POSTGRES_URL` names another); each run
creates its own database there and drops it at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.orm import Session, sessionmaker

from core.db import jobs, migrate
from core.db.models import (
    Adapter,
    Alias,
    AliasTarget,
    ApiKey,
    AuditLog,
    Base,
    Dataset,
    EvalMetric,
    EvalRun,
    Example,
    Job,
    LoopState,
    OnlineScore,
    Request,
    ReviewDecision,
    ReviewItem,
    Rollout,
    utcnow,
)
from core.db.session import make_engine, session_scope

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_TABLES = set(Base.metadata.tables)


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def column_values(obj: Base) -> dict[str, object]:
    return {attr.key: getattr(obj, attr.key) for attr in sa.inspect(type(obj)).column_attrs}


# --- migrations ---------------------------------------------------------------------------------


def test_migrations_upgrade_to_head_match_the_models_and_downgrade_to_nothing(db_url: str) -> None:
    assert migrate.current(db_url) is None
    migrate.upgrade(db_url)
    assert migrate.current(db_url) == migrate.head() == "0002"
    assert table_names(db_url) == MODEL_TABLES | {"alembic_version"}
    assert migrate.check_schema_matches_models(db_url) == []

    migrate.downgrade(db_url)
    assert migrate.current(db_url) is None
    assert table_names(db_url) <= {"alembic_version"}
    # Down really was complete: going up again meets no leftovers.
    migrate.upgrade(db_url)
    assert migrate.check_schema_matches_models(db_url) == []


def test_drift_between_database_and_models_is_reported(db_url: str) -> None:
    migrate.upgrade(db_url)
    engine = make_engine(db_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_jobs_status_priority_created_at")
    engine.dispose()
    diffs = migrate.check_schema_matches_models(db_url)
    assert [(d[0], d[1].name) for d in diffs] == [("add_index", "ix_jobs_status_priority_created_at")]


def test_env_migrates_through_a_connection_the_caller_provides(db_url: str) -> None:
    engine = make_engine(db_url)
    with engine.begin() as connection:
        config = migrate.alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    engine.dispose()
    assert migrate.current(db_url) == migrate.head()


def test_alembic_command_line_works_from_any_directory(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TUNEGATE_DATABASE__URL": url}
    ini = REPO_ROOT / "core" / "migrations" / "alembic.ini"
    subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    assert migrate.current(url) == migrate.head()


# --- the schema ---------------------------------------------------------------------------------


def test_a_row_in_every_table_round_trips(db_sessions: sessionmaker[Session]) -> None:
    stored: dict[tuple[type[Base], object], dict[str, object]] = {}
    with session_scope(db_sessions) as session:
        key = ApiKey(name="app", key_prefix="tg_abc", key_hash="h" * 64, role="admin", tokens_per_minute=9)
        parent = Adapter(name="support", version=1, base_model_hash="b", status="active", metrics={"a": 1})
        session.add_all([key, parent])
        session.flush()
        adapter = Adapter(
            name="support",
            version=2,
            base_model_hash="b",
            dataset_hash="d",
            config_hash="c",
            seed=7,
            parent_id=parent.id,
            servable=False,
            unservable_reason="rank 64 > max_lora_rank 16",
            status="candidate",
            metrics={"acc": 0.75, "per_topic": [0.5, 1.0]},
            manifest={"rank": 64},
        )
        alias = Alias(name="support", description="the support bot")
        session.add_all([adapter, alias])
        session.flush()
        target = AliasTarget(alias_id=alias.id, adapter_id=adapter.id, weight=0.05)
        request = Request(
            api_key_id=key.id,
            end_user="user-1",
            route="support",
            adapter_id=adapter.id,
            endpoint="/v1/chat/completions",
            stream=True,
            status_code=200,
            request_json={"messages": [{"role": "user", "content": "hi"}]},
            response_json={"choices": []},
            prompt_text="hi",
            answer_text="hello",
            prompt_tokens=3,
            completion_tokens=2,
            latency_ms=12.5,
            upstream_latency_ms=10.25,
            guardrail_ms=1.125,
            risk=0.3,
            decision="hold",
            guardrail_scores={"grounding": 0.9},
        )
        session.add_all([target, request])
        session.flush()
        item = ReviewItem(request_id=request.id, reason="held", claimed_by="rev", lease_expires_at=utcnow())
        dataset = Dataset(name="support-train", version=1, kind="train", content_hash="x", stats={"n": 1})
        session.add_all([item, dataset])
        session.flush()
        decision = ReviewDecision(review_item_id=item.id, reviewer="rev", verdict="edit", reason="typo")
        example = Example(
            dataset_id=dataset.id,
            messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}],
            source="review",
            source_request_id=request.id,
            split="train",
            content_hash="e",
        )
        run = EvalRun(kind="gate", adapter_id=adapter.id, dataset_id=dataset.id, summary={"win": True})
        audit = AuditLog(actor="admin", action="promote", object_type="adapter", object_id="2", detail={})
        job = Job(kind="train", payload={"dataset_id": dataset.id}, priority=5)
        session.add_all([decision, example, run, audit, job])
        session.flush()
        metric = EvalMetric(eval_run_id=run.id, name="accuracy", value=0.8125, n=16)
        score = OnlineScore(
            request_id=request.id, route="support", adapter_id=adapter.id, adapter_version="support/v2",
            window_start=utcnow(), risk=0.25, flagged=True, verdict="edit", overridden=False, gold_correct=True,
            judge_score=0.5, correct=True, latency_ms=3.5,
        )  # fmt: skip
        rollout = Rollout(route="support", candidate_id=adapter.id, baseline_id=parent.id, weights=[0.1, 1.0],
                          history=[{"step": 0, "passed": True}])  # fmt: skip
        state = LoopState(route="support", paused=True, reason="maintenance")
        session.add_all([metric, score, rollout, state])
        session.flush()
        for obj in session.identity_map.values():
            stored[type(obj), sa.inspect(obj).identity[0]] = column_values(obj)

    assert {model.__table__.name for model, _ in stored} == MODEL_TABLES
    with db_sessions() as session:
        for (model, row_id), values in stored.items():
            row = session.get(model, row_id)
            assert row is not None
            assert column_values(row) == values, model.__name__
        assert request.id and len(request.id) == 32
        read_back = session.get(Request, request.id)
        assert read_back is not None and read_back.created_at.utcoffset() == timedelta(0)
        assert [t.weight for t in session.get(Alias, alias.id).targets] == [0.05]


def test_datetimes_come_back_as_utc_and_naive_ones_are_refused(db_sessions: sessionmaker[Session]) -> None:
    two_hours_east = datetime(2030, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    with session_scope(db_sessions) as session:
        key = ApiKey(name="k", key_prefix="p", key_hash="h", revoked_at=two_hours_east)
        session.add(key)
    with db_sessions() as session:
        revoked_at = session.get(ApiKey, key.id).revoked_at
        assert revoked_at == datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
        assert revoked_at.tzinfo is UTC
        session.add(ApiKey(name="n", key_prefix="p", key_hash="h2", revoked_at=datetime(2030, 1, 1)))
        with pytest.raises(sa.exc.StatementError, match="naive datetime"):
            session.flush()


@pytest.mark.parametrize(
    "bad_row",
    [
        lambda: ApiKey(name="k", key_prefix="p", key_hash="h", role="root"),
        lambda: Adapter(name="a", version=1, base_model_hash="b", status="shipped"),
        lambda: Dataset(name="d", version=1, kind="validation"),
        lambda: Job(kind="train", payload={}, status="paused"),
        lambda: Job(kind="train", payload={}, max_attempts=0),
    ],
    ids=["api_key_role", "adapter_status", "dataset_kind", "job_status", "job_max_attempts"],
)
def test_check_constraints_reject_bad_values(db_sessions: sessionmaker[Session], bad_row) -> None:
    with db_sessions() as session:
        session.add(bad_row())
        with pytest.raises(sa.exc.IntegrityError, match=r"(?i)check"):
            session.flush()


def test_foreign_keys_are_enforced_and_alias_targets_go_with_their_alias(
    db_sessions: sessionmaker[Session],
) -> None:
    with db_sessions() as session:
        session.add(AliasTarget(alias_id=12345, weight=1.0))
        with pytest.raises(sa.exc.IntegrityError):
            session.flush()
    with session_scope(db_sessions) as session:
        alias = Alias(name="support")
        session.add(alias)
        session.flush()
        session.add_all([AliasTarget(alias_id=alias.id), AliasTarget(alias_id=alias.id, weight=0.0)])
    with session_scope(db_sessions) as session:
        # A bulk DELETE bypasses the ORM's cascade: only the database's ON DELETE CASCADE removes them.
        session.execute(sa.delete(Alias))
    with db_sessions() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(AliasTarget)) == 0


# --- the jobs queue -----------------------------------------------------------------------------


def test_claim_takes_due_jobs_of_the_asked_kinds_most_urgent_first(db_sessions: sessionmaker[Session]) -> None:
    with session_scope(db_sessions) as session:
        routine = jobs.enqueue(session, "train", {"n": 1})
        urgent = jobs.enqueue(session, "train", {"n": 2}, priority=5)
        jobs.enqueue(session, "eval", {"n": 3})
        jobs.enqueue(session, "train", {"n": 4}, priority=9, run_after=utcnow() + timedelta(hours=1))

    claimed = []
    for _ in range(3):
        with session_scope(db_sessions) as session:
            claimed.append(jobs.claim(session, "worker-1", kinds=["train"]))
    assert [job.id if job else None for job in claimed] == [urgent.id, routine.id, None]
    first = claimed[0]
    assert (first.status, first.claimed_by, first.attempts) == ("running", "worker-1", 1)
    assert first.payload == {"n": 2}
    assert first.lease_expires_at > utcnow() + timedelta(seconds=290)

    with session_scope(db_sessions) as session:
        done = jobs.complete(session, first, {"adapter": "support/2"})
    assert (done.status, done.result, done.lease_expires_at) == ("succeeded", {"adapter": "support/2"}, None)
    assert done.finished_at is not None
    with session_scope(db_sessions) as session, pytest.raises(jobs.LeaseLost):
        jobs.complete(session, first, {})


def test_fail_requeues_until_the_last_attempt(db_sessions: sessionmaker[Session]) -> None:
    with session_scope(db_sessions) as session:
        job = jobs.enqueue(session, "eval", {}, max_attempts=2)

    with session_scope(db_sessions) as session:
        first_try = jobs.claim(session, "worker-1")
    with session_scope(db_sessions) as session:
        requeued = jobs.fail(session, first_try, "vLLM not ready", retry_after_s=3600)
    assert (requeued.status, requeued.attempts, requeued.error, requeued.claimed_by) == (
        "queued",
        1,
        "vLLM not ready",
        None,
    )
    with session_scope(db_sessions) as session:
        assert jobs.claim(session, "worker-1") is None  # not before retry_after_s
        session.execute(sa.update(Job).values(run_after=utcnow()))

    with session_scope(db_sessions) as session:
        second_try = jobs.claim(session, "worker-2")
    assert (second_try.id, second_try.attempts) == (job.id, 2)
    with session_scope(db_sessions) as session:
        failed = jobs.fail(session, second_try, "out of memory")
    assert (failed.status, failed.error) == ("failed", "out of memory")
    assert failed.finished_at is not None
    with session_scope(db_sessions) as session:
        assert jobs.claim(session, "worker-1") is None


def expire_leases(factory: sessionmaker[Session]) -> None:
    # Stands in for a worker that stopped heartbeating a minute ago.
    with session_scope(factory) as session:
        session.execute(sa.update(Job).values(lease_expires_at=utcnow() - timedelta(minutes=1)))


def test_an_expired_lease_is_claimed_again_and_the_old_owner_loses_it(db_sessions: sessionmaker[Session]) -> None:
    with session_scope(db_sessions) as session:
        jobs.enqueue(session, "train", {})
    with session_scope(db_sessions) as session:
        stale = jobs.claim(session, "worker-1", lease_s=60)
    with session_scope(db_sessions) as session:
        assert jobs.claim(session, "worker-2") is None  # the lease still holds
    expire_leases(db_sessions)

    with session_scope(db_sessions) as session:
        taken_over = jobs.claim(session, "worker-2", lease_s=60)
    assert (taken_over.id, taken_over.claimed_by, taken_over.attempts) == (stale.id, "worker-2", 2)
    for late_call in (jobs.heartbeat, jobs.complete):
        with session_scope(db_sessions) as session, pytest.raises(jobs.LeaseLost):
            late_call(session, stale)

    with session_scope(db_sessions) as session:
        extended = jobs.heartbeat(session, taken_over, lease_s=600)
    assert extended.lease_expires_at > utcnow() + timedelta(seconds=590)
    with session_scope(db_sessions) as session:
        assert jobs.complete(session, extended, {}).status == "succeeded"


def test_an_expired_lease_on_the_last_attempt_fails_the_job(db_sessions: sessionmaker[Session]) -> None:
    with session_scope(db_sessions) as session:
        job = jobs.enqueue(session, "train", {}, max_attempts=1)
    with session_scope(db_sessions) as session:
        jobs.claim(session, "worker-1")
    expire_leases(db_sessions)
    with session_scope(db_sessions) as session:
        assert jobs.claim(session, "worker-2") is None
    with db_sessions() as session:
        abandoned = session.get(Job, job.id)
        assert abandoned.status == "failed" and "lease expired" in abandoned.error


def test_concurrent_workers_never_claim_the_same_job(db_sessions: sessionmaker[Session]) -> None:
    with session_scope(db_sessions) as session:
        for n in range(20):
            jobs.enqueue(session, "eval", {"n": n})
    claimed_by_worker: dict[str, list[int]] = {"worker-1": [], "worker-2": []}
    start_together = threading.Barrier(len(claimed_by_worker))
    errors: list[BaseException] = []

    def work(worker: str) -> None:
        try:
            start_together.wait()
            while True:
                with session_scope(db_sessions) as session:
                    job = jobs.claim(session, worker)
                    if job is None:
                        return
                    claimed_by_worker[worker].append(job.id)
                    # Hold the claim open a moment so the other worker meets a locked row.
                    time.sleep(0.005)
        except BaseException as err:  # reported by the main thread below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in claimed_by_worker]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors

    all_claims = claimed_by_worker["worker-1"] + claimed_by_worker["worker-2"]
    assert len(all_claims) == 20
    assert len(set(all_claims)) == 20
    with db_sessions() as session:
        rows = session.scalars(sa.select(Job)).all()
        assert {(job.status, job.attempts) for job in rows} == {("running", 1)}
