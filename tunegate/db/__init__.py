"""The database layer: the schema (`models`), engines and sessions (`session`), migrations
(`migrate`, with the Alembic scripts in `tunegate/migrations`), and the jobs queue that carries work
between processes (`jobs`).

It imports nothing of ours except `tunegate.settings` (only `tunegate/migrations/env.py` does, for the
default database URL of the `alembic` command line), so every other package may depend on it.
"""

from tunegate.db.jobs import LeaseLost, claim, complete, enqueue, fail, heartbeat
from tunegate.db.migrate import check_schema_matches_models, current, downgrade, head, upgrade
from tunegate.db.models import (
    Adapter,
    AdapterStatus,
    Alias,
    AliasTarget,
    ApiKey,
    AuditLog,
    Base,
    Dataset,
    DatasetKind,
    Decision,
    EvalKind,
    EvalMetric,
    EvalRun,
    EvalStatus,
    Example,
    ExampleSource,
    Job,
    JobStatus,
    Request,
    ReviewDecision,
    ReviewItem,
    ReviewReason,
    ReviewStatus,
    Role,
    Verdict,
    utcnow,
)
from tunegate.db.session import make_engine, session_factory, session_scope

__all__ = [
    "Adapter",
    "AdapterStatus",
    "Alias",
    "AliasTarget",
    "ApiKey",
    "AuditLog",
    "Base",
    "Dataset",
    "DatasetKind",
    "Decision",
    "EvalKind",
    "EvalMetric",
    "EvalRun",
    "EvalStatus",
    "Example",
    "ExampleSource",
    "Job",
    "JobStatus",
    "LeaseLost",
    "Request",
    "ReviewDecision",
    "ReviewItem",
    "ReviewReason",
    "ReviewStatus",
    "Role",
    "Verdict",
    "check_schema_matches_models",
    "claim",
    "complete",
    "current",
    "downgrade",
    "enqueue",
    "fail",
    "head",
    "heartbeat",
    "make_engine",
    "session_factory",
    "session_scope",
    "upgrade",
    "utcnow",
]
