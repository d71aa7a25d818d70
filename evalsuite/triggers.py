"""Triggers: when the loop files a training job for a route, and the data snapshot it trains on.

A route retrains when any of these holds (`loop.trigger`): at least `min_new_labels` reviewed labels
arrived since its last training, its active version's online quality fell below `quality_below` (on at
least `min_scored_for_quality` scored exchanges), or its inputs drifted (`on_drift`). None of them fires
while the route's loop is paused, while a candidate of the route is still on its way (waiting for
the gate, gated and about to be canaried, or in its canary), within `cooldown_s` of the last training,
or past `max_per_day` trainings in one UTC day.

The job (`jobs` kind `train`) carries a snapshot: the rows it trains on, written once to a JSONL file
named by its content hash, so a retried job trains on exactly the same data, and the record says what
it was: reviewed labels of the route (the conversation the reviewer saw with the approved or corrected
answer), a replay sample of the active version's own training data, and any curated rows an operator
added. Imports `core` and `evalsuite`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.db import Adapter, Job, Rollout, enqueue, utcnow
from core.io import atomic_write_bytes, jsonl_text, sha256_text
from core.lifecycle import audit, is_paused
from core.loop_settings import LoopSettings
from core.vocab import AdapterStatus, JobStatus, RolloutStatus
from evalsuite import testsets

TRAIN_JOB = "train"


@dataclass
class TriggerDecision:
    route: str
    fire: bool
    reasons: list[str] = field(default_factory=list)  # why it fires
    blocked_by: str | None = None  # why it does not, although a reason holds
    new_labels: int = 0
    last_training: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def training_jobs(session: Session, route: str) -> list[Job]:
    """The route's training jobs, newest first (the payload names the route)."""
    jobs = session.scalars(sa.select(Job).where(Job.kind == TRAIN_JOB).order_by(Job.created_at.desc())).all()
    return [j for j in jobs if (j.payload or {}).get("route") == route]


def _in_flight(session: Session, route: str, jobs: list[Job]) -> str | None:
    if any(j.status in (JobStatus.QUEUED, JobStatus.RUNNING) for j in jobs):
        return "a training job of the route is queued or running"
    if session.scalar(sa.select(Rollout.id).where(Rollout.route == route, Rollout.status == RolloutStatus.RUNNING)):
        return "a canary of the route is running"
    trained = {(j.result or {}).get("adapter_id") for j in jobs}
    waiting = session.scalars(
        sa.select(Adapter.id).where(Adapter.status.in_([AdapterStatus.CANDIDATE, AdapterStatus.GATED]))
    ).all()
    if trained & set(waiting):
        return "a candidate of the route is waiting for the gate"
    return None


def decide(
    session: Session,
    route: str,
    settings: LoopSettings,
    quality: float | None = None,
    scored: int = 0,
    drifted: bool = False,
    now: datetime | None = None,
) -> TriggerDecision:
    """Whether the route retrains now (see the module docstring); nothing is written."""
    now = now or utcnow()
    rules = settings.trigger
    jobs = training_jobs(session, route)
    last = jobs[0].created_at if jobs else None
    decision = TriggerDecision(route, False, last_training=last.isoformat() if last else None)
    decision.new_labels = testsets.labels_since(session, route, last)
    if decision.new_labels >= rules.min_new_labels:
        decision.reasons.append(f"{decision.new_labels} new reviewed training labels (>= {rules.min_new_labels})")
    if quality is not None and scored >= rules.min_scored_for_quality and quality < rules.quality_below:
        decision.reasons.append(f"online quality {quality:.3f} < {rules.quality_below} on {scored} exchanges")
    if drifted and rules.on_drift:
        decision.reasons.append("the route's inputs drifted")
    if not decision.reasons:
        return decision
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if is_paused(session, route):
        decision.blocked_by = "the loop is paused for this route"
    elif blocked := _in_flight(session, route, jobs):
        decision.blocked_by = blocked
    elif last is not None and now - last < timedelta(seconds=rules.cooldown_s):
        decision.blocked_by = f"cool-down: last training {int((now - last).total_seconds())} s ago"
    elif sum(j.created_at >= today for j in jobs) >= rules.max_per_day:
        decision.blocked_by = f"daily cap of {rules.max_per_day} trainings reached"
    elif decision.new_labels == 0:
        decision.blocked_by = "no reviewed labels to learn from"
    decision.fire = decision.blocked_by is None
    return decision


def snapshot_rows(
    session: Session, route: str, replay: list[dict], curated: list[dict], settings: LoopSettings, seed: int = 0
) -> tuple[list[dict], dict]:
    """The rows a training job of the route learns from, and how many came from where."""
    labels = [{"messages": r["messages"]} for r in testsets.training_labels(session, route)]
    rng = random.Random(seed)
    sample = rng.sample(replay, min(settings.replay_rows, len(replay)))
    rows = labels + [{"messages": r["messages"]} for r in sample] + [{"messages": r["messages"]} for r in curated]
    rng.shuffle(rows)
    return rows, {"reviewed_labels": len(labels), "replay": len(sample), "curated": len(curated)}


def file_training_job(
    session: Session, decision: TriggerDecision, rows: list[dict], counts: dict, snapshot_dir: Path, actor: str = "loop"
) -> Job:
    """Write the snapshot (named by its content hash) and enqueue the training job for it."""
    text = jsonl_text(rows)
    content_hash = sha256_text(text)
    path = snapshot_dir / f"{decision.route}-{content_hash[:16]}.jsonl"
    if not path.exists():
        snapshot_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, text.encode())
    payload = {
        "route": decision.route,
        "snapshot": str(path),
        "content_hash": content_hash,
        "rows": len(rows),
        "counts": counts,
        "reasons": decision.reasons,
    }
    job = enqueue(session, TRAIN_JOB, payload, priority=5, max_attempts=2)
    audit(session, actor, "loop.trigger", "route", decision.route, {"job_id": job.id, **payload})
    return job
