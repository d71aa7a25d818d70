"""Priority review: beyond the held answers, the review queue is filled with the let-through answers
that teach most, within a budget per route and UTC day, not with a fixed random sample.

Owns the choice. A candidate is an allowed or annotated request of the route from the last day that
has no review item yet; each gets three components in [0, 1]:

- `near_threshold`: risk just below the route's hold threshold, `1 - (hold_at - risk) / near_threshold`
  when `hold_at - near_threshold <= risk < hold_at`, else 0 (the guard was almost unsure);
- `novelty`: `1 - max cosine similarity` of the question to the training texts (far from what the
  model learnt); 0 when there are no training texts (nothing to be far from);
- `drift`: the max cosine similarity to the drift report's typical drifted questions, rescaled from
  `DRIFT_SIM_FLOOR`..1 to 0..1 (unrelated questions of one domain are never quite dissimilar, so only
  a close neighbour of a drift cluster counts).

`priority = W_NEAR * near_threshold + W_NOVELTY * novelty + W_DRIFT * drift` (weights below: the
guard's own doubt first, then novelty, then drift). The top `budget left` candidates with priority > 0
become pending `priority` review items (one reviewer each), each with an `audit_log` row carrying its
components. The budget left is `loop.review_budget_per_day` minus the priority items already created
for the route since 00:00 UTC. On PostgreSQL a transaction-scoped advisory lock per route makes two
workers take turns; on SQLite the database's single writer does the same (the later writer fails).

Imports `core` (db, io, lifecycle, loop_settings, vocab), numpy and SQLAlchemy. Embeddings come from
the caller (`evalsuite.drift.minilm_embedder()` in production). Flushes, never commits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.db import Request, ReviewItem, utcnow
from core.db.leases import advisory_lock
from core.db.models import new_uuid_hex
from core.io import last_user_text
from core.lifecycle import audit
from core.loop_settings import LoopSettings
from core.vocab import Decision, ReviewReason, ReviewStatus

W_NEAR = 0.5
W_NOVELTY = 0.3
W_DRIFT = 0.2
WEIGHTS = {"near_threshold": W_NEAR, "novelty": W_NOVELTY, "drift": W_DRIFT}
DRIFT_SIM_FLOOR = 0.5
CANDIDATE_WINDOW = timedelta(days=1)
MAX_CANDIDATES = 5000  # the newest; bounds the embedding work of one call
LET_THROUGH = (Decision.ALLOW.value, Decision.ANNOTATE.value)
ACTOR = "loop"
ROUND = 6

Embedder = Callable[[list[str]], np.ndarray]


@dataclass
class PriorityChoice:
    """One candidate's components and priority (`item_id` set once it is queued)."""

    request_id: str
    risk: float | None
    near_threshold: float
    novelty: float
    drift: float
    priority: float
    item_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PriorityResult:
    """What one `fill_review_queue` call found and queued."""

    route: str
    budget: int  # `loop.review_budget_per_day`
    used_before: int  # priority items created today before this call
    candidates: int
    chosen: list[PriorityChoice] = field(default_factory=list)

    @property
    def budget_left(self) -> int:
        return max(0, self.budget - self.used_before - len(self.chosen))

    def to_dict(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "budget": self.budget,
            "used_before": self.used_before,
            "candidates": self.candidates,
            "queued": len(self.chosen),
            "budget_left": self.budget_left,
            "weights": dict(WEIGHTS),
            "chosen": [c.to_dict() for c in self.chosen],
        }


def near_threshold_score(risk: float | None, hold_at: float, near_threshold: float) -> float:
    """1 just below `hold_at`, falling linearly to 0 at `hold_at - near_threshold`; 0 outside."""
    if risk is None or near_threshold <= 0 or not hold_at - near_threshold <= risk < hold_at:
        return 0.0
    return float(min(1.0, max(0.0, 1.0 - (hold_at - risk) / near_threshold)))


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def max_similarity(embed: Embedder, texts: Sequence[str], reference: Sequence[str]) -> np.ndarray:
    """Per text, the largest cosine similarity to any reference text (0 with no reference)."""
    if not texts or not reference:
        return np.zeros(len(texts))
    sims = _unit(embed(list(texts))) @ _unit(embed(list(reference))).T
    return np.clip(sims.max(axis=1), -1.0, 1.0)


def day_start(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def priority_items_today(session: Session, route: str, now: datetime) -> int:
    """Priority review items created for `route` since 00:00 UTC of `now`'s day."""
    query = (
        sa.select(sa.func.count())
        .select_from(ReviewItem)
        .join(Request, Request.id == ReviewItem.request_id)
        .where(Request.route == route, ReviewItem.reason == ReviewReason.PRIORITY)
        .where(ReviewItem.created_at >= day_start(now), ReviewItem.created_at <= now)
    )
    return int(session.scalar(query) or 0)


def _candidates(session: Session, route: str, now: datetime) -> list[Request]:
    in_review = sa.exists().where(ReviewItem.request_id == Request.id)
    query = (
        sa.select(Request)
        .where(Request.route == route, Request.decision.in_(LET_THROUGH), ~in_review)
        .where(Request.created_at >= now - CANDIDATE_WINDOW, Request.created_at <= now)
        .order_by(Request.created_at.desc(), Request.id)
        .limit(MAX_CANDIDATES)
    )
    return list(session.scalars(query))


def score_candidates(
    requests: Sequence[Request],
    settings: LoopSettings,
    hold_at: float,
    training_texts: Sequence[str],
    embed: Embedder,
    drift_texts: Sequence[str] = (),
) -> list[PriorityChoice]:
    """The components and priority of each request, in the given order."""
    questions = [last_user_text((r.request_json or {}).get("messages"), r.prompt_text or "") for r in requests]
    asked = [i for i, q in enumerate(questions) if q.strip()]
    texts = [questions[i] for i in asked]
    novelty = np.zeros(len(requests))
    drift = np.zeros(len(requests))
    if texts and training_texts:
        novelty[asked] = np.clip(1.0 - max_similarity(embed, texts, training_texts), 0.0, 1.0)
    if texts and drift_texts:
        sims = max_similarity(embed, texts, drift_texts)
        drift[asked] = np.clip((sims - DRIFT_SIM_FLOOR) / (1.0 - DRIFT_SIM_FLOOR), 0.0, 1.0)
    out = []
    for i, request in enumerate(requests):
        near = near_threshold_score(request.risk, hold_at, settings.near_threshold)
        priority = W_NEAR * near + W_NOVELTY * float(novelty[i]) + W_DRIFT * float(drift[i])
        out.append(PriorityChoice(
            request.id, request.risk, round(near, ROUND), round(float(novelty[i]), ROUND),
            round(float(drift[i]), ROUND), round(priority, ROUND),
        ))  # fmt: skip
    return out


def fill_review_queue(
    session: Session,
    route: str,
    settings: LoopSettings,
    hold_at: float,
    training_texts: Sequence[str],
    embed: Embedder,
    drift_texts: Sequence[str] = (),
    now: datetime | None = None,
) -> PriorityResult:
    """Queue the route's most useful let-through answers for review, within today's budget left.

    `hold_at` is the route's hold threshold (`guardrails.policy`), `training_texts` the questions the
    route's active version was trained on, `drift_texts` the drift report's typical drifted questions."""
    now = now or utcnow()
    advisory_lock(session, f"tunegate.prioritise:{route}")
    used = priority_items_today(session, route, now)
    budget = settings.review_budget_per_day
    left = max(0, budget - used)
    candidates = _candidates(session, route, now) if left else []
    result = PriorityResult(route, budget, used, len(candidates))
    if not candidates:
        return result
    scored = score_candidates(candidates, settings, hold_at, training_texts, embed, drift_texts)
    ranked = sorted(enumerate(scored), key=lambda pair: (-pair[1].priority, pair[0]))  # ties: newest first
    for _, choice in ranked[:left]:
        if choice.priority <= 0:
            break
        choice.item_id = new_uuid_hex()
        session.add(ReviewItem(id=choice.item_id, request_id=choice.request_id, reason=ReviewReason.PRIORITY,
                               status=ReviewStatus.PENDING, required_verdicts=1, created_at=now))  # fmt: skip
        audit(session, ACTOR, "review.prioritised", "review_item", choice.item_id,
              {"route": route, "hold_at": hold_at, "weights": dict(WEIGHTS), **choice.to_dict()})  # fmt: skip
        result.chosen.append(choice)
    session.flush()
    return result
