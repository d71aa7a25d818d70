"""The initial schema: every table of core.db.models as of the first release.

Written out in full (not imported from the models) so this revision keeps creating the same schema
after the models move on. Constraint names go through op.f() because they are final already; the
naming convention on the target metadata would otherwise prefix them a second time.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def json_document() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def one_of(table: str, column: str, values: Sequence[str]) -> sa.CheckConstraint:
    allowed = ", ".join(f"'{value}'" for value in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=op.f(f"ck_{table}_{column}"))


def foreign_key(table: str, column: str, target: str, ondelete: str | None = None) -> sa.ForeignKeyConstraint:
    """`table.column` references `target.id`."""
    name = op.f(f"fk_{table}_{column}_{target}")
    return sa.ForeignKeyConstraint([column], [f"{target}.id"], name=name, ondelete=ondelete)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key_prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("requests_per_minute", sa.Integer(), nullable=True),
        sa.Column("tokens_per_minute", sa.Integer(), nullable=True),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("revoked_at", timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
        one_of("api_keys", "role", ["app", "reviewer", "admin"]),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("base_model_hash", sa.String(128), nullable=False),
        sa.Column("dataset_hash", sa.String(128), nullable=True),
        sa.Column("config_hash", sa.String(128), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=True),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("servable", sa.Boolean(), nullable=False),
        sa.Column("unservable_reason", sa.Text(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metrics", json_document(), nullable=True),
        sa.Column("manifest", json_document(), nullable=True),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
        foreign_key("adapters", "parent_id", "adapters"),
        sa.UniqueConstraint("name", "version", name=op.f("uq_adapters_name_version")),
        one_of("adapters", "status", ["registered", "candidate", "canary", "active", "retired", "rejected"]),
    )
    op.create_table(
        "aliases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_aliases")),
        sa.UniqueConstraint("name", name=op.f("uq_aliases_name")),
    )
    op.create_table(
        "alias_targets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("alias_id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=True),
        sa.Column("weight", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alias_targets")),
        foreign_key("alias_targets", "alias_id", "aliases", ondelete="CASCADE"),
        foreign_key("alias_targets", "adapter_id", "adapters"),
        sa.CheckConstraint("weight >= 0", name=op.f("ck_alias_targets_weight_not_negative")),
    )
    op.create_index(op.f("ix_alias_targets_alias_id"), "alias_targets", ["alias_id"])
    op.create_table(
        "requests",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("end_user", sa.String(200), nullable=True),
        sa.Column("route", sa.String(200), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=True),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("request_json", json_document(), nullable=True),
        sa.Column("response_json", json_document(), nullable=True),
        sa.Column("prompt_text", sa.Text(), nullable=True),
        sa.Column("answer_text", sa.Text(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Double(), nullable=True),
        sa.Column("upstream_latency_ms", sa.Double(), nullable=True),
        sa.Column("guardrail_ms", sa.Double(), nullable=True),
        sa.Column("risk", sa.Double(), nullable=True),
        sa.Column("decision", sa.String(16), nullable=True),
        sa.Column("guardrail_scores", json_document(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_requests")),
        foreign_key("requests", "api_key_id", "api_keys"),
        foreign_key("requests", "adapter_id", "adapters"),
        one_of("requests", "decision", ["allow", "annotate", "hold", "block"]),
    )
    op.create_index(op.f("ix_requests_created_at"), "requests", ["created_at"])
    op.create_index(op.f("ix_requests_route_created_at"), "requests", ["route", "created_at"])
    op.create_table(
        "review_items",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("required_verdicts", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", timestamp(), nullable=True),
        sa.Column("final_verdict", sa.String(16), nullable=True),
        sa.Column("final_answer", sa.Text(), nullable=True),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("decided_at", timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_items")),
        foreign_key("review_items", "request_id", "requests"),
        one_of("review_items", "reason", ["held", "sampled"]),
        one_of("review_items", "status", ["pending", "claimed", "decided", "expired"]),
        one_of("review_items", "final_verdict", ["approve", "reject", "edit"]),
        sa.CheckConstraint("required_verdicts >= 1", name=op.f("ck_review_items_required_verdicts_positive")),
    )
    op.create_index(op.f("ix_review_items_request_id"), "review_items", ["request_id"])
    op.create_index(op.f("ix_review_items_status_created_at"), "review_items", ["status", "created_at"])
    op.create_table(
        "review_decisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("review_item_id", sa.String(32), nullable=False),
        sa.Column("reviewer", sa.String(200), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("corrected_answer", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_decisions")),
        foreign_key("review_decisions", "review_item_id", "review_items"),
        sa.UniqueConstraint("review_item_id", "reviewer", name=op.f("uq_review_decisions_review_item_id_reviewer")),
        one_of("review_decisions", "verdict", ["approve", "reject", "edit"]),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", timestamp(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(100), nullable=False),
        sa.Column("object_type", sa.String(100), nullable=True),
        sa.Column("object_id", sa.String(100), nullable=True),
        sa.Column("detail", json_document(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_at"), "audit_log", ["at"])
    op.create_index(op.f("ix_audit_log_object_type_object_id"), "audit_log", ["object_type", "object_id"])
    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("content_hash", sa.String(128), nullable=True),
        sa.Column("frozen", sa.Boolean(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("stats", json_document(), nullable=True),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        foreign_key("datasets", "parent_id", "datasets"),
        sa.UniqueConstraint("name", "version", name=op.f("uq_datasets_name_version")),
        one_of("datasets", "kind", ["train", "test", "holdout", "raw"]),
    )
    op.create_table(
        "examples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("messages", json_document(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("source_request_id", sa.String(32), nullable=True),
        sa.Column("split", sa.String(32), nullable=True),
        sa.Column("content_hash", sa.String(128), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_examples")),
        foreign_key("examples", "dataset_id", "datasets", ondelete="CASCADE"),
        foreign_key("examples", "source_request_id", "requests"),
        one_of("examples", "source", ["seed", "review", "generated", "import"]),
    )
    op.create_index(op.f("ix_examples_dataset_id"), "examples", ["dataset_id"])
    op.create_index(op.f("ix_examples_content_hash"), "examples", ["content_hash"])
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=True),
        sa.Column("dataset_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", timestamp(), nullable=False),
        sa.Column("finished_at", timestamp(), nullable=True),
        sa.Column("summary", json_document(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_eval_runs")),
        foreign_key("eval_runs", "adapter_id", "adapters"),
        foreign_key("eval_runs", "dataset_id", "datasets"),
        one_of("eval_runs", "kind", ["online", "gate", "holdout", "canary"]),
        one_of("eval_runs", "status", ["running", "succeeded", "failed"]),
    )
    op.create_table(
        "eval_metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("eval_run_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=True),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_eval_metrics")),
        foreign_key("eval_metrics", "eval_run_id", "eval_runs", ondelete="CASCADE"),
    )
    op.create_index(op.f("ix_eval_metrics_eval_run_id"), "eval_metrics", ["eval_run_id"])
    op.create_index(op.f("ix_eval_metrics_name_created_at"), "eval_metrics", ["name", "created_at"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("payload", json_document(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", timestamp(), nullable=True),
        sa.Column("run_after", timestamp(), nullable=True),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("started_at", timestamp(), nullable=True),
        sa.Column("finished_at", timestamp(), nullable=True),
        sa.Column("result", json_document(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        one_of("jobs", "status", ["queued", "running", "succeeded", "failed", "cancelled"]),
        sa.CheckConstraint("max_attempts >= 1", name=op.f("ck_jobs_max_attempts_positive")),
    )
    op.create_index(op.f("ix_jobs_status_priority_created_at"), "jobs", ["status", "priority", "created_at"])


def downgrade() -> None:
    # Referencing tables first; dropping a table drops its indexes and constraints with it.
    for table in (
        "jobs",
        "eval_metrics",
        "eval_runs",
        "examples",
        "datasets",
        "audit_log",
        "review_decisions",
        "review_items",
        "requests",
        "alias_targets",
        "aliases",
        "adapters",
        "api_keys",
    ):
        op.drop_table(table)
