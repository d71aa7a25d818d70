"""Taking one row of a queue table under a lease, safely when many processes take at once.

One function, `claim_next`, used by every queue in tunegate: the jobs table (`core.db.jobs.claim`)
and the review queue (`gateway.review.queue.ReviewQueue.claim`). The caller says which rows may be
taken (`claimable`, a SQL condition that must also be false for a row already taken), in which order,
and what taking one writes (`values`: status, owner, lease expiry, ...). Of all the processes racing
for the same row, exactly one gets it:

* PostgreSQL: `SELECT ... FOR UPDATE SKIP LOCKED` picks the first claimable row nobody else is taking
  right now (rows another transaction holds are skipped, not waited for, so N workers take N rows),
  then one UPDATE takes it. The row lock also re-checks `claimable` against a claim committed since
  the statement began.
* SQLite (no row locks): pick the first claimable row, then UPDATE it only if it is still claimable;
  the UPDATE's row count says whether this caller won. A loser tries the next candidate.

It flushes but never commits: commit right after (until then others skip, or on SQLite wait for, the
row). Imports SQLAlchemy only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session


def claim_next(
    session: Session,
    model: type,
    claimable: sa.ColumnElement[bool],
    order_by: Sequence[Any],
    values: Mapping[str, Any],
) -> Any | None:
    """Take the first `claimable` row of `model` in `order_by` order, writing `values` into it; return
    its primary key (`model.id`), or None when no row is claimable. `values` may hold SQL expressions
    (e.g. `attempts=Job.attempts + 1`); the session's copy of the row is not refreshed (use
    `session.get(model, id, populate_existing=True)`)."""
    candidate = sa.select(model.id).where(claimable).order_by(*order_by).limit(1)
    if session.get_bind().dialect.name == "postgresql":
        row_id = session.scalar(candidate.with_for_update(of=model, skip_locked=True))
        if row_id is None:
            return None
        session.execute(
            sa.update(model).where(model.id == row_id).values(**values).execution_options(synchronize_session=False)
        )
        return row_id
    while True:
        row_id = session.scalar(candidate)
        if row_id is None:
            return None
        won = session.execute(
            sa.update(model)
            .where(model.id == row_id, claimable)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if won.rowcount == 1:
            return row_id


def advisory_lock(session: Session, name: str) -> None:
    """Take turns on `name` (e.g. one route's review budget) until the transaction ends: a PostgreSQL
    transaction-level advisory lock. SQLite has one writer at a time, which serialises writers anyway."""
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        session.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))
