"""The database layer: the schema (`models`), engines and sessions (`session`), migrations
(`migrate`, with the Alembic scripts in `core/migrations`), the jobs queue that carries work
between processes (`jobs`), and the one lease claim that jobs and review items share (`leases`).

It imports nothing of ours except `core.settings` (only `core/migrations/env.py` does, for the
default database URL of the `alembic` command line), so every other package may depend on it.
"""

from core.db.jobs import LeaseLost, claim, complete, enqueue, fail, heartbeat
from core.db.migrate import check_schema_matches_models, current, downgrade, head, upgrade
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
from core.db.session import make_engine, session_factory, session_scope

__all__ = [
    "Adapter",
    "Alias",
    "AliasTarget",
    "ApiKey",
    "AuditLog",
    "Base",
    "Dataset",
    "EvalMetric",
    "EvalRun",
    "Example",
    "Job",
    "LeaseLost",
    "LoopState",
    "OnlineScore",
    "Request",
    "ReviewDecision",
    "ReviewItem",
    "Rollout",
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
