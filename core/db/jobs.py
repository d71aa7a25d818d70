"""The work queue between tunegate processes: rows of the `jobs` table, claimed under a lease.

A worker `claim`s the most urgent due job (highest priority, then oldest), commits at once so
others see it taken, runs it without holding a transaction, calls `heartbeat` while it runs
longer than its lease, and ends with `complete` or `fail`. A job whose worker died (its lease
expired) is claimed again, until it has been tried `max_attempts` times; then it fails.

Every claim increments `attempts`, and `heartbeat`, `complete` and `fail` only touch the job if
`attempts` still equals what the caller claimed: a worker that lost its lease (and whose job is
now someone else's) gets `LeaseLost` instead of overwriting the new owner's work.

These functions flush but never commit: the caller's transaction decides, e.g. `session_scope`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.db.leases import claim_next
from core.db.models import Job, utcnow
from core.vocab import JobStatus


@dataclass(frozen=True)
class Claim:
    """What a worker keeps of a job it claimed: enough for `heartbeat`, `complete` and `fail` (they match on
    `id` and `attempts`) without holding the ORM row, or a session, while the work runs."""

    id: int
    attempts: int
    max_attempts: int
    claimed_by: str | None

    @classmethod
    def of(cls, job: Job) -> Claim:
        return cls(job.id, job.attempts, job.max_attempts, job.claimed_by)


class LeaseLost(Exception):
    """The job is no longer this worker's: it was finished, or claimed again after the lease expired."""


def enqueue(
    session: Session,
    kind: str,
    payload: dict[str, Any],
    priority: int = 0,
    run_after: datetime | None = None,
    max_attempts: int = 3,
) -> Job:
    """Add a queued job; higher `priority` runs first, and not before `run_after` when given."""
    job = Job(kind=kind, payload=payload, priority=priority, run_after=run_after, max_attempts=max_attempts)
    session.add(job)
    session.flush()
    return job


def _claimable(now: datetime, kinds: Iterable[str] | None) -> sa.ColumnElement[bool]:
    due = sa.and_(Job.status == JobStatus.QUEUED, sa.or_(Job.run_after.is_(None), Job.run_after <= now))
    abandoned = sa.and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now, Job.attempts < Job.max_attempts)
    condition = sa.or_(due, abandoned)
    if kinds is not None:
        condition = sa.and_(condition, Job.kind.in_(list(kinds)))
    return condition


def _fail_abandoned_on_last_attempt(session: Session, now: datetime) -> None:
    # SKIP LOCKED (PostgreSQL; SQLite has one writer and ignores it) keeps two workers sweeping at
    # once from waiting on, or deadlocking over, each other's rows.
    abandoned = (
        sa.select(Job.id)
        .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now, Job.attempts >= Job.max_attempts)
        .with_for_update(skip_locked=True)
        # A subquery of its own over `jobs`, not one correlated with the UPDATE's row.
        .correlate(None)
    )
    session.execute(
        sa.update(Job)
        .where(Job.id.in_(abandoned.scalar_subquery()))
        .values(
            status=JobStatus.FAILED,
            finished_at=now,
            lease_expires_at=None,
            error="the lease expired on the last attempt (the worker stopped or hung)",
        )
        .execution_options(synchronize_session=False)
    )


def claim(session: Session, worker: str, kinds: Iterable[str] | None = None, lease_s: float = 300) -> Job | None:
    """Take the most urgent due job (of `kinds`, if given) for `worker`, or None when there is none.

    Commit right after: until then other workers skip (PostgreSQL) or wait for (SQLite) the row. The
    race between workers is `core.db.leases.claim_next`'s (one winner per job).
    """
    now = utcnow()
    _fail_abandoned_on_last_attempt(session, now)
    job_id = claim_next(
        session,
        Job,
        _claimable(now, kinds),
        order_by=(Job.priority.desc(), Job.created_at, Job.id),  # most urgent first
        values={
            "status": JobStatus.RUNNING,
            "claimed_by": worker,
            "attempts": Job.attempts + 1,
            "lease_expires_at": now + timedelta(seconds=lease_s),
            "started_at": now,
        },
    )
    return None if job_id is None else session.get(Job, job_id, populate_existing=True)


def _update_if_still_owned(session: Session, job: Job | Claim, **values: Any) -> Job:
    changed = session.execute(
        sa.update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.RUNNING, Job.attempts == job.attempts)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if changed.rowcount != 1:
        raise LeaseLost(f"job {job.id} (attempt {job.attempts}, {job.claimed_by}) is no longer held")
    refreshed = session.get(Job, job.id, populate_existing=True)
    assert refreshed is not None  # the UPDATE just matched it
    return refreshed


def heartbeat(session: Session, job: Job | Claim, lease_s: float = 300) -> Job:
    """Extend the lease of a job this worker still holds; raise `LeaseLost` otherwise."""
    return _update_if_still_owned(session, job, lease_expires_at=utcnow() + timedelta(seconds=lease_s))


def complete(session: Session, job: Job | Claim, result: dict[str, Any] | None = None) -> Job:
    """Mark a held job succeeded with `result`; returns the job as stored now."""
    return _update_if_still_owned(
        session,
        job,
        status=JobStatus.SUCCEEDED,
        result=result,
        error=None,
        finished_at=utcnow(),
        lease_expires_at=None,
    )


def fail(session: Session, job: Job | Claim, error: str, retry_after_s: float = 0) -> Job:
    """Record `error`; requeue the job (not before `retry_after_s`) unless its last attempt failed."""
    now = utcnow()
    # `job.attempts` is safe to decide on: the UPDATE applies only while it equals the stored count.
    if job.attempts >= job.max_attempts:
        return _update_if_still_owned(
            session, job, status=JobStatus.FAILED, error=error, finished_at=now, lease_expires_at=None
        )
    return _update_if_still_owned(
        session,
        job,
        status=JobStatus.QUEUED,
        error=error,
        claimed_by=None,
        lease_expires_at=None,
        run_after=now + timedelta(seconds=retry_after_s),
    )
