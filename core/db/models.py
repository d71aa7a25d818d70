"""The schema: one SQLAlchemy model per table that the loop stores, portable across SQLite and PostgreSQL.

Enumerated columns are plain strings guarded by CHECK constraints (the allowed values are the `StrEnum`
classes of `core.vocab`), JSON is JSONB on PostgreSQL, and every timestamp is timezone-aware UTC on both backends.
Constraint names come from `NAMING_CONVENTION`, so `migrations/versions/` can name them literally and
`core.db.migrate.check_schema_matches_models` can prove the migrations and these models agree.
Changing a table here means writing a migration that does the same.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from core.vocab import (
    AdapterStatus,
    DatasetKind,
    Decision,
    EvalKind,
    EvalStatus,
    ExampleSource,
    JobStatus,
    ReviewReason,
    ReviewStatus,
    Role,
    RolloutStatus,
    Verdict,
)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_uuid_hex() -> str:
    return uuid.uuid4().hex


class UtcDateTime(sa.TypeDecorator[datetime]):
    """`DateTime(timezone=True)` that always hands back aware UTC datetimes.

    SQLite has no time zones: it stores the wall-clock digits and returns naive datetimes, so a value
    written at +02:00 would silently shift and compare wrongly with `utcnow()`. Converting to UTC on the
    way in keeps stored text ordered by instant (lease and run_after comparisons happen in SQL), and
    tagging UTC on the way out gives callers the same type on both backends. Naive datetimes are refused
    because their zone is a guess.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime (e.g. utcnow())")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# None means SQL NULL (not the JSON literal `null`), so "IS NULL" finds unset documents on both backends.
JSONDocument = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def one_of(column: str, values: type[StrEnum], name: str | None = None) -> sa.CheckConstraint:
    """CHECK that `column` holds one of the enum's values (NULL passes, as SQL CHECKs do)."""
    allowed = ", ".join(f"'{v.value}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=name or column)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime(), dict[str, Any]: JSONDocument, float: sa.Double()}


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (one_of("role", Role),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    key_prefix: Mapped[str] = mapped_column(sa.String(16))
    key_hash: Mapped[str] = mapped_column(sa.String(128), unique=True)
    role: Mapped[str] = mapped_column(sa.String(16), default=Role.APP)
    requests_per_minute: Mapped[int | None]
    tokens_per_minute: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (sa.UniqueConstraint("name", "version"), one_of("status", AdapterStatus))

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    version: Mapped[int]
    base_model_hash: Mapped[str] = mapped_column(sa.String(128))
    dataset_hash: Mapped[str | None] = mapped_column(sa.String(128))
    config_hash: Mapped[str | None] = mapped_column(sa.String(128))
    seed: Mapped[int | None]
    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("adapters.id"))
    servable: Mapped[bool] = mapped_column(default=True)
    unservable_reason: Mapped[str | None] = mapped_column(sa.Text)
    status: Mapped[str] = mapped_column(sa.String(16), default=AdapterStatus.CANDIDATE)
    metrics: Mapped[dict[str, Any] | None]
    manifest: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    parent: Mapped[Adapter | None] = relationship(remote_side=[id])


class Alias(Base):
    __tablename__ = "aliases"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    description: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    targets: Mapped[list[AliasTarget]] = relationship(
        back_populates="alias", cascade="all, delete-orphan", passive_deletes=True
    )


class AliasTarget(Base):
    """One weighted destination of an alias; weights are relative, so a canary is e.g. 95 / 5."""

    __tablename__ = "alias_targets"
    __table_args__ = (sa.CheckConstraint("weight >= 0", name="weight_not_negative"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    alias_id: Mapped[int] = mapped_column(sa.ForeignKey("aliases.id", ondelete="CASCADE"), index=True)
    # NULL routes to the base model without an adapter.
    adapter_id: Mapped[int | None] = mapped_column(sa.ForeignKey("adapters.id"))
    weight: Mapped[float] = mapped_column(default=1.0)

    alias: Mapped[Alias] = relationship(back_populates="targets")
    adapter: Mapped[Adapter | None] = relationship()


class Request(Base):
    """The traffic log: one row per API call, written before the client hears back."""

    __tablename__ = "requests"
    __table_args__ = (
        one_of("decision", Decision),
        sa.Index("ix_requests_created_at", "created_at"),
        sa.Index("ix_requests_route_created_at", "route", "created_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_uuid_hex)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    api_key_id: Mapped[int | None] = mapped_column(sa.ForeignKey("api_keys.id"))
    end_user: Mapped[str | None] = mapped_column(sa.String(200))
    route: Mapped[str] = mapped_column(sa.String(200))
    adapter_id: Mapped[int | None] = mapped_column(sa.ForeignKey("adapters.id"))
    endpoint: Mapped[str] = mapped_column(sa.String(64))
    stream: Mapped[bool] = mapped_column(default=False)
    status_code: Mapped[int | None]
    request_json: Mapped[dict[str, Any] | None]
    response_json: Mapped[dict[str, Any] | None]
    prompt_text: Mapped[str | None] = mapped_column(sa.Text)
    answer_text: Mapped[str | None] = mapped_column(sa.Text)
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    latency_ms: Mapped[float | None]
    upstream_latency_ms: Mapped[float | None]
    guardrail_ms: Mapped[float | None]
    risk: Mapped[float | None]
    decision: Mapped[str | None] = mapped_column(sa.String(16))
    guardrail_scores: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(sa.Text)


class ReviewItem(Base):
    __tablename__ = "review_items"
    __table_args__ = (
        one_of("reason", ReviewReason),
        one_of("status", ReviewStatus),
        one_of("final_verdict", Verdict),
        sa.CheckConstraint("required_verdicts >= 1", name="required_verdicts_positive"),
        sa.Index("ix_review_items_status_created_at", "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_uuid_hex)
    request_id: Mapped[str] = mapped_column(sa.ForeignKey("requests.id"), index=True)
    reason: Mapped[str] = mapped_column(sa.String(16))
    status: Mapped[str] = mapped_column(sa.String(16), default=ReviewStatus.PENDING)
    required_verdicts: Mapped[int] = mapped_column(default=1)
    claimed_by: Mapped[str | None] = mapped_column(sa.String(200))
    lease_expires_at: Mapped[datetime | None]
    final_verdict: Mapped[str | None] = mapped_column(sa.String(16))
    final_answer: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[datetime | None]

    request: Mapped[Request] = relationship()
    decisions: Mapped[list[ReviewDecision]] = relationship(back_populates="review_item")


class ReviewDecision(Base):
    __tablename__ = "review_decisions"
    __table_args__ = (sa.UniqueConstraint("review_item_id", "reviewer"), one_of("verdict", Verdict))

    id: Mapped[int] = mapped_column(primary_key=True)
    review_item_id: Mapped[str] = mapped_column(sa.ForeignKey("review_items.id"))
    reviewer: Mapped[str] = mapped_column(sa.String(200))
    verdict: Mapped[str] = mapped_column(sa.String(16))
    corrected_answer: Mapped[str | None] = mapped_column(sa.Text)
    reason: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    review_item: Mapped[ReviewItem] = relationship(back_populates="decisions")


class AuditLog(Base):
    __tablename__ = "audit_log"
    __table_args__ = (sa.Index("ix_audit_log_object_type_object_id", "object_type", "object_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(sa.String(200))
    action: Mapped[str] = mapped_column(sa.String(100))
    object_type: Mapped[str | None] = mapped_column(sa.String(100))
    object_id: Mapped[str | None] = mapped_column(sa.String(100))
    detail: Mapped[dict[str, Any] | None]


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (sa.UniqueConstraint("name", "version"), one_of("kind", DatasetKind))

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    version: Mapped[int]
    kind: Mapped[str] = mapped_column(sa.String(16))
    content_hash: Mapped[str | None] = mapped_column(sa.String(128))
    frozen: Mapped[bool] = mapped_column(default=False)
    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("datasets.id"))
    stats: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    parent: Mapped[Dataset | None] = relationship(remote_side=[id])
    examples: Mapped[list[Example]] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", passive_deletes=True
    )


class Example(Base):
    __tablename__ = "examples"
    __table_args__ = (one_of("source", ExampleSource),)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(sa.ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    # OpenAI chat messages: [{"role": "user", "content": "..."}, ...]; a list, hence not dict-typed.
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSONDocument)
    source: Mapped[str] = mapped_column(sa.String(16))
    source_request_id: Mapped[str | None] = mapped_column(sa.ForeignKey("requests.id"))
    split: Mapped[str | None] = mapped_column(sa.String(32))
    content_hash: Mapped[str] = mapped_column(sa.String(128), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    dataset: Mapped[Dataset] = relationship(back_populates="examples")


class EvalRun(Base):
    __tablename__ = "eval_runs"
    __table_args__ = (one_of("kind", EvalKind), one_of("status", EvalStatus))

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(16))
    adapter_id: Mapped[int | None] = mapped_column(sa.ForeignKey("adapters.id"))
    dataset_id: Mapped[int | None] = mapped_column(sa.ForeignKey("datasets.id"))
    status: Mapped[str] = mapped_column(sa.String(16), default=EvalStatus.RUNNING)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    summary: Mapped[dict[str, Any] | None]

    metrics: Mapped[list[EvalMetric]] = relationship(
        back_populates="eval_run", cascade="all, delete-orphan", passive_deletes=True
    )


class EvalMetric(Base):
    __tablename__ = "eval_metrics"
    __table_args__ = (sa.Index("ix_eval_metrics_name_created_at", "name", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    eval_run_id: Mapped[int] = mapped_column(sa.ForeignKey("eval_runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    value: Mapped[float]
    n: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    eval_run: Mapped[EvalRun] = relationship(back_populates="metrics")


class OnlineScore(Base):
    """One sampled live exchange, scored by a worker: what the eval suite knows about its quality.

    `correct` is the best judgement available (the test set's gold answer, else the reviewer's
    verdict, else the judge); `overridden` says a reviewer rejected or edited an answer the guard let
    through. Windows are `window_start` buckets of `loop.window_s` seconds."""

    __tablename__ = "online_scores"
    __table_args__ = (sa.Index("ix_online_scores_route_window_start", "route", "window_start"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(sa.ForeignKey("requests.id", ondelete="CASCADE"), unique=True)
    route: Mapped[str] = mapped_column(sa.String(200))
    adapter_id: Mapped[int | None] = mapped_column(sa.ForeignKey("adapters.id"))
    adapter_version: Mapped[str] = mapped_column(sa.String(232))  # `base` or `support/v3`
    window_start: Mapped[datetime]
    scored_at: Mapped[datetime] = mapped_column(default=utcnow)
    risk: Mapped[float | None]
    flagged: Mapped[bool] = mapped_column(default=False)  # the guard held or blocked it
    verdict: Mapped[str | None] = mapped_column(sa.String(16))
    overridden: Mapped[bool | None]
    gold_correct: Mapped[bool | None]
    judge_score: Mapped[float | None]
    correct: Mapped[bool | None]
    error: Mapped[bool] = mapped_column(default=False)
    latency_ms: Mapped[float | None]


class Rollout(Base):
    """A canary: one gated candidate taking a route's traffic step by step beside the active version."""

    __tablename__ = "rollouts"
    __table_args__ = (one_of("status", RolloutStatus), sa.Index("ix_rollouts_route_status", "route", "status"))

    id: Mapped[int] = mapped_column(primary_key=True)
    route: Mapped[str] = mapped_column(sa.String(200))
    candidate_id: Mapped[int] = mapped_column(sa.ForeignKey("adapters.id"))
    # NULL: the active version is the base model.
    baseline_id: Mapped[int | None] = mapped_column(sa.ForeignKey("adapters.id"))
    status: Mapped[str] = mapped_column(sa.String(16), default=RolloutStatus.RUNNING)
    step: Mapped[int] = mapped_column(default=0)  # index into `weights`
    weights: Mapped[list[float]] = mapped_column(JSONDocument)  # the canary's share at each step
    step_started_at: Mapped[datetime] = mapped_column(default=utcnow)
    failures: Mapped[int] = mapped_column(default=0)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSONDocument, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class LoopState(Base):
    """Per route: whether the closed loop may act (`tunegate loop pause|resume`)."""

    __tablename__ = "loop_state"

    route: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    paused: Mapped[bool] = mapped_column(default=False)
    reason: Mapped[str | None] = mapped_column(sa.Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Job(Base):
    """A unit of work handed between processes; see `core.db.jobs` for the claim protocol."""

    __tablename__ = "jobs"
    __table_args__ = (
        one_of("status", JobStatus),
        sa.CheckConstraint("max_attempts >= 1", name="max_attempts_positive"),
        sa.Index("ix_jobs_status_priority_created_at", "status", "priority", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(sa.String(16), default=JobStatus.QUEUED)
    # Higher runs first.
    priority: Mapped[int] = mapped_column(default=0)
    # Incremented by every claim, so (id, attempts) also names one claim: a worker whose lease expired
    # and was re-claimed elsewhere can no longer complete, fail or extend the job.
    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    claimed_by: Mapped[str | None] = mapped_column(sa.String(200))
    lease_expires_at: Mapped[datetime | None]
    run_after: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(sa.Text)
