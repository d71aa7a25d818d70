"""The closed loop: adapter lifecycle (gated, rolled_back), prioritised review, online scores,
canary rollouts and the loop's pause switch.

`registered` adapters become `candidate` (nothing checked them); CHECK constraints are rebuilt with
batch operations so SQLite (which cannot ALTER a constraint) gets the same schema as PostgreSQL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADAPTER_STATUS_0001 = ["registered", "candidate", "canary", "active", "retired", "rejected"]
ADAPTER_STATUS = ["candidate", "gated", "canary", "active", "retired", "rejected", "rolled_back"]
REVIEW_REASON_0001 = ["held", "sampled"]
REVIEW_REASON = ["held", "sampled", "priority"]
EVAL_KIND_0001 = ["online", "gate", "holdout", "canary"]
EVAL_KIND = ["online", "gate", "holdout", "canary", "calibration"]


def timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def json_document() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def check(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def recheck(table: str, column: str, values: Sequence[str]) -> None:
    with op.batch_alter_table(table) as batch:
        batch.drop_constraint(op.f(f"ck_{table}_{column}"), type_="check")
        batch.create_check_constraint(op.f(f"ck_{table}_{column}"), check(column, values))


def upgrade() -> None:
    recheck("adapters", "status", ADAPTER_STATUS_0001 + ["gated", "rolled_back"])
    op.execute("UPDATE adapters SET status = 'candidate' WHERE status = 'registered'")
    recheck("adapters", "status", ADAPTER_STATUS)
    recheck("review_items", "reason", REVIEW_REASON)
    recheck("eval_runs", "kind", EVAL_KIND)
    op.create_table(
        "online_scores",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(32), nullable=False),
        sa.Column("route", sa.String(200), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=True),
        sa.Column("adapter_version", sa.String(232), nullable=False),
        sa.Column("window_start", timestamp(), nullable=False),
        sa.Column("scored_at", timestamp(), nullable=False),
        sa.Column("risk", sa.Double(), nullable=True),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=True),
        sa.Column("overridden", sa.Boolean(), nullable=True),
        sa.Column("gold_correct", sa.Boolean(), nullable=True),
        sa.Column("judge_score", sa.Double(), nullable=True),
        sa.Column("correct", sa.Boolean(), nullable=True),
        sa.Column("error", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_online_scores")),
        sa.ForeignKeyConstraint(["request_id"], ["requests.id"], name=op.f("fk_online_scores_request_id_requests"),
                                ondelete="CASCADE"),  # fmt: skip
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"], name=op.f("fk_online_scores_adapter_id_adapters")),
        sa.UniqueConstraint("request_id", name=op.f("uq_online_scores_request_id")),
    )
    op.create_index(op.f("ix_online_scores_route_window_start"), "online_scores", ["route", "window_start"])
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("route", sa.String(200), nullable=False),
        sa.Column("candidate_id", sa.Integer(), nullable=False),
        sa.Column("baseline_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("weights", json_document(), nullable=False),
        sa.Column("step_started_at", timestamp(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("history", json_document(), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("finished_at", timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
        sa.ForeignKeyConstraint(["candidate_id"], ["adapters.id"], name=op.f("fk_rollouts_candidate_id_adapters")),
        sa.ForeignKeyConstraint(["baseline_id"], ["adapters.id"], name=op.f("fk_rollouts_baseline_id_adapters")),
        sa.CheckConstraint(check("status", ["running", "promoted", "rolled_back"]), name=op.f("ck_rollouts_status")),
    )
    op.create_index(op.f("ix_rollouts_route_status"), "rollouts", ["route", "status"])
    op.create_table(
        "loop_state",
        sa.Column("route", sa.String(200), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("updated_at", timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("route", name=op.f("pk_loop_state")),
    )


def downgrade() -> None:
    op.drop_table("loop_state")
    op.drop_table("rollouts")
    op.drop_table("online_scores")
    op.execute("UPDATE eval_runs SET kind = 'gate' WHERE kind = 'calibration'")
    recheck("eval_runs", "kind", EVAL_KIND_0001)
    op.execute("UPDATE review_items SET reason = 'sampled' WHERE reason = 'priority'")
    recheck("review_items", "reason", REVIEW_REASON_0001)
    recheck("adapters", "status", ADAPTER_STATUS + ["registered"])
    op.execute("UPDATE adapters SET status = 'rejected' WHERE status = 'rolled_back'")
    op.execute("UPDATE adapters SET status = 'candidate' WHERE status = 'gated'")
    recheck("adapters", "status", ADAPTER_STATUS_0001)
