"""Online scoring: a stable sample of live traffic per route, each exchange scored once, stored per
adapter version and time window (`online_scores`).

Owns which requests are sampled (`sampled`: a hash of the request id below `loop.score_sample_rate`, so
every worker and every re-run makes the same choice), the score of one exchange (the guard's risk and
decision, the error and latency, the reviewer's verdict where there is one, the gold answer where the
test set has the question, an optional judge) and the per-window summaries the trigger, the canary,
the reports and the metrics read (`window_quality`, `current_quality`).

`correct` is the best judgement available: the gold answer, else the reviewer's verdict (approve),
else the judge (score >= 0.5), else unknown. `overridden` is asked only of answers the guard let
through (allow / annotate) that a reviewer decided: True when the reviewer rejected or edited it;
None for answers not reviewed, and for held or blocked ones (the guard already flagged those).

Concurrent workers are safe: `online_scores.request_id` is unique and rows go in with
`INSERT ... ON CONFLICT DO NOTHING` (SQLite and PostgreSQL; other dialects row by row in savepoints).
A review decided after its exchange was scored reaches the score through `refresh_verdicts`.

Imports `core` (db, io, lifecycle, loop_settings, vocab), numpy and SQLAlchemy; nothing above floor 2.
Functions flush, never commit: the caller's transaction decides.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import Adapter, OnlineScore, Request, ReviewItem, utcnow
from core.io import last_user_text, normalise_answer
from core.lifecycle import BASE
from core.loop_settings import LoopSettings
from core.settings import GuardrailSettings
from core.vocab import Decision, Verdict

SCORED_ENDPOINTS = ("chat", "completions")  # what the gateway's recorder writes in `requests.endpoint`
FLAGGED = (Decision.HOLD.value, Decision.BLOCK.value)
LET_THROUGH = (Decision.ALLOW.value, Decision.ANNOTATE.value)
OVERRIDES = (Verdict.REJECT.value, Verdict.EDIT.value)
JUDGE_CORRECT_AT = 0.5
LOOKBACK_S = 86400.0  # how far back unscored traffic is looked for (the unsampled rest stays unscored)
SCAN_BATCH = 5000
ROUND = 6

Judge = Callable[[str, str], float]


def sampled(request_id: str, rate: float) -> bool:
    """The sampling decision for one request: the first 8 bytes of sha256(id) as a share of 2**64, below
    `rate`. Stable across workers, processes and re-runs."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    digest = hashlib.sha256(request_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def window_start(at: datetime, window_s: float) -> datetime:
    """`at` floored to a multiple of `window_s` seconds since the epoch (UTC)."""
    seconds = math.floor(at.timestamp() / window_s) * window_s
    return datetime.fromtimestamp(seconds, UTC)


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), ROUND)


@dataclass
class ScoreBatch:
    """What one `score_new_traffic` call did."""

    examined: int = 0  # unscored requests looked at
    sampled: int = 0
    inserted: int = 0
    duplicates: int = 0  # scored meanwhile by another worker
    with_gold: int = 0
    reviewed: int = 0
    judged: int = 0
    judge_errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _candidate_ids(
    session: Session, settings: LoopSettings, since: datetime, until: datetime, limit: int
) -> tuple[list[str], int]:
    """Sampled ids of unscored requests created in [since, until], oldest first, at most `limit`."""
    already = sa.exists().where(OnlineScore.request_id == Request.id)
    base = (
        sa.select(Request.id, Request.created_at)
        .where(Request.route.is_not(None), Request.endpoint.in_(SCORED_ENDPOINTS), Request.created_at >= since,
               Request.created_at <= until, ~already)
        .order_by(Request.created_at, Request.id)
    )  # fmt: skip
    chosen: list[str] = []
    examined = 0
    after: tuple[datetime, str] | None = None
    while len(chosen) < limit:
        query = base if after is None else base.where(sa.tuple_(Request.created_at, Request.id) > sa.tuple_(*after))
        page = session.execute(query.limit(SCAN_BATCH)).all()
        if not page:
            break
        examined += len(page)
        chosen.extend(rid for rid, _ in page if sampled(rid, settings.score_sample_rate))
        after = (page[-1][1], page[-1][0])
        if len(page) < SCAN_BATCH:
            break
    return chosen[:limit], examined


def _decided_verdicts(session: Session, request_ids: Sequence[str]) -> dict[str, str]:
    """request id -> the final verdict of its most recently decided review item."""
    out: dict[str, str] = {}
    for i in range(0, len(request_ids), 500):
        rows = session.execute(
            sa.select(ReviewItem.request_id, ReviewItem.final_verdict)
            .where(ReviewItem.request_id.in_(request_ids[i : i + 500]), ReviewItem.final_verdict.is_not(None))
            .order_by(ReviewItem.decided_at)
        )  # fmt: skip
        out.update({rid: verdict for rid, verdict in rows})
    return out


def judged_from_verdict(decision: str | None, verdict: str | None) -> tuple[bool | None, bool | None]:
    """(overridden, reviewer-says-correct) of a decided verdict on an answer with this guard decision."""
    if verdict is None:
        return None, None
    overridden = (verdict in OVERRIDES) if decision in LET_THROUGH else None
    return overridden, verdict == Verdict.APPROVE


def insert_scores(session: Session, rows: list[dict[str, Any]]) -> int:
    """Insert `online_scores` rows, skipping requests already scored (by another worker); returns the
    number inserted. One savepoint around the batch."""
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        statement = insert(OnlineScore).on_conflict_do_nothing(index_elements=["request_id"])
        with session.begin_nested():
            inserted = session.scalars(statement.returning(OnlineScore.request_id), rows).all()
        return len(inserted)
    inserted = 0
    for row in rows:  # any other dialect: one savepoint a row, a duplicate rolled back alone
        try:
            with session.begin_nested():
                session.execute(sa.insert(OnlineScore), [row])
            inserted += 1
        except IntegrityError:
            continue
    return inserted


def score_new_traffic(
    session: Session,
    settings: LoopSettings,
    gold: Mapping[str, str],
    judge: Judge | None = None,
    now: datetime | None = None,
    limit: int = 1000,
    lookback_s: float = LOOKBACK_S,
) -> ScoreBatch:
    """Score up to `limit` sampled, not yet scored requests of the last `lookback_s` seconds.

    `gold` maps `normalise_answer(question)` to the gold answer (`evalsuite.testsets.gold_answers`, of
    every route: questions are looked up as asked). `judge(question, answer)` gives a score in [0, 1]
    (1: correct); a judge that raises leaves that exchange unjudged and is counted in `judge_errors`."""
    now = now or utcnow()
    batch = ScoreBatch()
    ids, batch.examined = _candidate_ids(session, settings, now - timedelta(seconds=lookback_s), now, limit)
    batch.sampled = len(ids)
    if not ids:
        return batch
    verdicts = _decided_verdicts(session, ids)
    query = (
        sa.select(Request, Adapter.name, Adapter.version)
        .outerjoin(Adapter, Adapter.id == Request.adapter_id)
        .where(Request.id.in_(ids))
        .order_by(Request.created_at, Request.id)
    )
    rows = []
    for request, name, version in session.execute(query):
        question = last_user_text((request.request_json or {}).get("messages"), request.prompt_text or "")
        answer = request.answer_text
        gold_correct = None
        expected = gold.get(normalise_answer(question)) if question else None
        if expected is not None and answer is not None:
            gold_correct = normalise_answer(answer) == normalise_answer(expected)
            batch.with_gold += 1
        verdict = verdicts.get(request.id)
        overridden, approved = judged_from_verdict(request.decision, verdict)
        batch.reviewed += verdict is not None
        judge_score = None
        if judge is not None and answer is not None:
            try:
                judge_score = float(judge(question, answer))
                batch.judged += 1
            except Exception:  # noqa: BLE001 - a broken judge leaves the exchange unjudged, not unscored
                batch.judge_errors += 1
                judge_score = None
            if judge_score is not None and not math.isfinite(judge_score):
                judge_score = None
        if gold_correct is not None:
            correct = gold_correct
        elif approved is not None:
            correct = approved
        elif judge_score is not None:
            correct = judge_score >= JUDGE_CORRECT_AT
        else:
            correct = None
        rows.append({
            "request_id": request.id,
            "route": request.route,
            "adapter_id": request.adapter_id,
            "adapter_version": BASE if request.adapter_id is None else f"{name}/v{version}",
            "window_start": window_start(request.created_at, settings.window_s),
            "scored_at": now,
            "risk": request.risk,
            "flagged": request.decision in FLAGGED,
            "verdict": verdict,
            "overridden": overridden,
            "gold_correct": gold_correct,
            "judge_score": judge_score,
            "correct": correct,
            "error": (request.status_code is not None and request.status_code >= 500) or request.error is not None,
            "latency_ms": request.latency_ms,
        })  # fmt: skip
    batch.inserted = insert_scores(session, rows)
    batch.duplicates = len(rows) - batch.inserted
    return batch


def refresh_verdicts(session: Session) -> int:
    """Bring reviews decided after their exchange was scored into the scores (verdict, overridden and,
    without a gold answer, correct); returns the number of scores updated."""
    query = (
        sa.select(OnlineScore, Request.decision, ReviewItem.final_verdict)
        .join(Request, Request.id == OnlineScore.request_id)
        .join(ReviewItem, ReviewItem.request_id == OnlineScore.request_id)
        .where(ReviewItem.final_verdict.is_not(None))
        .where(sa.or_(OnlineScore.verdict.is_(None), OnlineScore.verdict != ReviewItem.final_verdict))
        .order_by(ReviewItem.decided_at)
    )
    updated: dict[int, OnlineScore] = {}
    for score, decision, verdict in session.execute(query):
        score.verdict = verdict
        score.overridden, approved = judged_from_verdict(decision, verdict)
        if score.gold_correct is None:
            score.correct = approved
        updated[score.id] = score
    session.flush()
    return len(updated)


# --- summaries --------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return _round(float(np.mean(values))) if values else None


def _summary(scores: Sequence[OnlineScore]) -> dict[str, Any]:
    judged = [bool(s.correct) for s in scores if s.correct is not None]
    reviewed = [bool(s.overridden) for s in scores if s.overridden is not None]
    risks = [float(s.risk) for s in scores if s.risk is not None]
    latencies = [float(s.latency_ms) for s in scores if s.latency_ms is not None]
    n = len(scores)
    return {
        "n": n,
        "judged": len(judged),
        "quality": _mean(judged),
        "flag_rate": _round(sum(s.flagged for s in scores) / n) if n else None,
        "reviewed": len(reviewed),
        "override_rate": _mean(reviewed),
        "error_rate": _round(sum(s.error for s in scores) / n) if n else None,
        "mean_risk": _mean(risks),
        "p95_latency_ms": _round(float(np.percentile(latencies, 95))) if latencies else None,
    }


@dataclass
class WindowRow:
    """Scores of one version of a route since `window_start`: one window (`window_quality`), or the newest
    `last_n` scores (`current_quality`, `window_start` is then the oldest window among them). `quality` is
    the mean of `correct` over the `judged` scores; `override_rate` is over the `reviewed` let-through
    answers; rates are None on no data."""

    route: str
    adapter_version: str
    window_start: datetime | None
    n: int
    judged: int
    quality: float | None
    flag_rate: float | None
    reviewed: int
    override_rate: float | None
    error_rate: float | None
    mean_risk: float | None
    p95_latency_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["window_start"] = self.window_start.isoformat() if self.window_start else None
        return out


def window_quality(session: Session, route: str | None = None, since: datetime | None = None) -> list[WindowRow]:
    """Per (route, adapter version, window) summaries, ordered by route, window, version."""
    query = sa.select(OnlineScore)
    if route is not None:
        query = query.where(OnlineScore.route == route)
    if since is not None:
        query = query.where(OnlineScore.window_start >= since)
    groups: dict[tuple[str, str, datetime], list[OnlineScore]] = {}
    for score in session.scalars(query):
        groups.setdefault((score.route, score.adapter_version, score.window_start), []).append(score)
    rows = [WindowRow(r, v, w, **_summary(scores)) for (r, v, w), scores in groups.items()]
    return sorted(rows, key=lambda row: (row.route, row.window_start, row.adapter_version))


def current_quality(session: Session, route: str, adapter_version: str, last_n: int = 200) -> WindowRow:
    """The newest `last_n` scores (by window, then id) of `adapter_version` on `route`."""
    query = (
        sa.select(OnlineScore)
        .where(OnlineScore.route == route, OnlineScore.adapter_version == adapter_version)
        .order_by(OnlineScore.window_start.desc(), OnlineScore.id.desc())
        .limit(last_n)
    )
    scores = session.scalars(query).all()
    oldest = min((s.window_start for s in scores), default=None)
    return WindowRow(route, adapter_version, oldest, **_summary(scores))


def llm_judge(settings: GuardrailSettings) -> Judge | None:
    """The optional LLM judge (`guardrails.judge_url`, the guardrails' judge detector) as scoring's
    `judge(question, answer)`: 1 when the judge finds the answer supported; None when none is set."""
    if not settings.judge_url:
        return None
    from guardrails.detectors.judge import JudgeDetector
    from guardrails.types import CheckInput

    detector = JudgeDetector(settings.judge_url, settings.judge_model or "judge", settings.judge_api_key)

    def judge(question: str, answer: str) -> float:
        result = detector(CheckInput(question=question, answer=answer))
        if result.score is None:  # unknown: counted in `judge_errors`, the exchange stays unjudged
            raise RuntimeError(f"the judge gave no verdict: {result.evidence}")
        return 1.0 - result.score

    return judge
