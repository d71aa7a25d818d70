"""Canary rollouts with automatic rollback: a gated candidate takes a route's traffic step by step.

Owns the `rollouts` rows' life: `start_rollout` (gated -> canary, the first split), `step_window` (the
traffic of the current step, per arm, from the `requests` and `review_items` tables), `judge_step`
(canary against active on the same window), `advance` (one evaluation: wait, next step, promote, a
failed step, or roll back), `canary_state` (the metric) and `running_rollouts`.

A step is judged once the canary arm has `step_requests` requests, or once `step_seconds` have passed
with at least `MIN_TIMED_REQUESTS` canary requests (`min(10, step_requests)`); until then, and always
with no canary traffic at all, the answer is "wait". The step fails when the canary is worse at level
`alpha` (one-sided) on calibrated risk (Mann-Whitney), hold rate, reviewer override rate or error rate
(Fisher), or when its p95 latency exceeds `max_latency_ratio` x the active's (only with >= 20 latencies
on each side). At 100 % the active version takes no traffic, so the final step's active arm is the
active's traffic since the rollout began.

Routing: while the canary runs the route has exactly two targets (baseline, candidate); a rollback
gives the route `{baseline: 1.0}` and drops the candidate's row (the `route.weights` audit row keeps
its last weight); a promotion gives `{candidate: 1.0}`.

Several workers may call `advance` at once: the rollout row is locked (`SELECT ... FOR UPDATE` on
PostgreSQL) and the judgement is written by a compare-and-set UPDATE on (id, running, step, failures),
so each judgement is applied once; a worker that loses the race gets "wait" and changes nothing.
Functions flush, never commit: the caller's transaction decides.

May import `core` (db, lifecycle, loop settings, vocab), `evalsuite.stats` and third-party libraries;
never `gateway`, `training` or `tunegate`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from core.db import Adapter, Alias, Request, ReviewItem, Rollout, utcnow
from core.lifecycle import (
    BASE,
    LifecycleError,
    active_target,
    audit,
    route_table,
    serving_targets,
    set_weights,
    transition,
    version_label,
)
from core.loop_settings import CanarySettings
from core.vocab import AdapterStatus, Decision, RolloutStatus, Verdict
from evalsuite.stats import compare_means, compare_rates

MIN_TIMED_REQUESTS = 10  # canary requests a step judged by time (`step_seconds`) still needs
MIN_LATENCIES = 20  # latencies each arm needs before p95s are compared
HELD = (Decision.HOLD.value, Decision.BLOCK.value)
LET_THROUGH = (Decision.ALLOW.value, Decision.ANNOTATE.value)
OVERRIDES = (Verdict.REJECT.value, Verdict.EDIT.value)

WAIT, NEXT_STEP, PROMOTED, ROLLED_BACK, FAILED_STEP = "wait", "next_step", "promoted", "rolled_back", "failed_step"


@dataclass
class Arm:
    """One side's traffic in a window. `reviewed`: requests the guard let through (allow/annotate) whose
    review is decided; `overridden`: those of them a reviewer rejected or edited."""

    n: int = 0
    risks: list[float] = field(default_factory=list)
    held: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    reviewed: int = 0
    overridden: int = 0

    def summary(self) -> dict[str, int]:
        return {"n": self.n, "risks": len(self.risks), "held": self.held, "errors": self.errors,
                "latencies": len(self.latencies), "reviewed": self.reviewed, "overridden": self.overridden}  # fmt: skip


@dataclass
class StepWindow:
    route: str
    step: int
    weight: float  # the canary's share in this step
    started_at: datetime  # the step's start: the canary arm's window is [started_at, until]
    until: datetime
    active_since: datetime  # the active arm's start: started_at, or the rollout's start at 100 %
    canary: Arm
    active: Arm

    @property
    def elapsed_s(self) -> float:
        return (self.until - self.started_at).total_seconds()

    def summary(self) -> dict[str, Any]:
        return {"step": self.step, "weight": self.weight, "started_at": self.started_at.isoformat(),
                "until": self.until.isoformat(), "active_since": self.active_since.isoformat(),
                "elapsed_s": round(self.elapsed_s, 3), "canary": self.canary.summary(),
                "active": self.active.summary()}  # fmt: skip


@dataclass(frozen=True)
class StepJudgement:
    passed: bool | None  # None: wait (not enough canary traffic yet)
    reasons: list[str]
    comparisons: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lock_alias(session: Session, route: str) -> Alias:
    alias = session.scalar(sa.select(Alias).where(Alias.name == route).with_for_update())
    if alias is None:
        raise LifecycleError(f"route `{route}` is not in the database (seed it from the settings first)")
    return alias


def running_rollouts(session: Session) -> list[Rollout]:
    return list(session.scalars(sa.select(Rollout).where(Rollout.status == RolloutStatus.RUNNING).order_by(Rollout.id)))


def start_rollout(
    session: Session, route: str, candidate: Adapter, settings: CanarySettings, actor: str = "loop",
    evidence: dict | None = None, now: datetime | None = None,
) -> Rollout:  # fmt: skip
    """Put a `gated` candidate on `route` at the first step's share beside the route's active version.

    `LifecycleError` for a candidate that is not gated, a route that already has a running rollout, a
    route without an active version, or a route serving more than its active version (a split the
    canary would silently overwrite)."""
    now = now or utcnow()
    _lock_alias(session, route)  # serialises two starts on one route (PostgreSQL)
    if candidate.status != AdapterStatus.GATED:
        raise LifecycleError(f"{version_label(candidate)} is {candidate.status}; only a gated version may canary")
    running = session.scalar(
        sa.select(Rollout.id).where(Rollout.route == route, Rollout.status == RolloutStatus.RUNNING)
    )
    if running is not None:
        raise LifecycleError(f"route `{route}` already has a running rollout (#{running})")
    targets = route_table(session).get(route, [])
    baseline = active_target(targets)
    if baseline is None:
        raise LifecycleError(f"route `{route}` has no active version to compare a canary with")
    others = [t.label for t in serving_targets(targets) if t.adapter_id != baseline.adapter_id]
    if others:
        raise LifecycleError(f"route `{route}` also serves {', '.join(others)}; a canary needs a single active target")
    first = settings.steps[0]
    why = f"canary of {version_label(candidate)} on `{route}` against {baseline.label}"
    transition(session, candidate, AdapterStatus.CANARY, actor, why, evidence)
    set_weights(session, route, {baseline.adapter_id: 1.0 - first, candidate.id: first}, actor,
                f"{why}: step 0 at {first:.0%}", evidence)  # fmt: skip
    rollout = Rollout(route=route, candidate_id=candidate.id, baseline_id=baseline.adapter_id,
                      status=RolloutStatus.RUNNING, step=0, weights=list(settings.steps), step_started_at=now,
                      failures=0, history=[], created_at=now)  # fmt: skip
    session.add(rollout)
    session.flush()
    audit(session, actor, "rollout.started", "rollout", rollout.id,
          {"route": route, "candidate": version_label(candidate), "baseline": baseline.label,
           "steps": list(settings.steps), "evidence": dict(evidence or {})})  # fmt: skip
    session.flush()
    return rollout


def step_window(session: Session, rollout: Rollout, until: datetime | None = None) -> StepWindow:
    """The route's traffic of the current step, split into the canary and the active arm.

    Canary: requests on `rollout.route` served by the candidate with `step_started_at <= created_at <=
    until`. Active: those served by the baseline (adapter_id IS NULL for the base model) in the same
    window, or since the rollout began when the canary takes 100 %. Errors are status >= 500 or an
    error text; holds are `hold`/`block` decisions; risks and latencies skip NULLs."""
    until = until or utcnow()
    weight = float(rollout.weights[rollout.step])
    started = rollout.step_started_at
    active_since = rollout.created_at if weight >= 1.0 else started
    base_id = rollout.baseline_id
    baseline = Request.adapter_id.is_(None) if base_id is None else Request.adapter_id == base_id
    canary_rows = sa.and_(Request.adapter_id == rollout.candidate_id, Request.created_at >= started)
    active_rows = sa.and_(baseline, Request.created_at >= active_since)
    columns = (Request.id, Request.adapter_id, Request.risk, Request.decision, Request.status_code,
               Request.error.is_not(None), Request.latency_ms)  # fmt: skip
    in_window = (Request.route == rollout.route, Request.created_at <= until, sa.or_(canary_rows, active_rows))
    window = sa.select(*columns).where(*in_window)
    rows = session.execute(window).all()
    ids = sa.select(window.subquery().c.id)
    verdicts: dict[str, set[str]] = {}
    for request_id, verdict in session.execute(
        sa.select(ReviewItem.request_id, ReviewItem.final_verdict)
        .where(ReviewItem.request_id.in_(ids), ReviewItem.final_verdict.is_not(None))
    ):  # fmt: skip
        verdicts.setdefault(request_id, set()).add(verdict)
    canary, active = Arm(), Arm()
    for request_id, adapter_id, risk, decision, status_code, has_error, latency in rows:
        arm = canary if adapter_id == rollout.candidate_id else active
        arm.n += 1
        if risk is not None:
            arm.risks.append(float(risk))
        arm.held += decision in HELD
        arm.errors += bool(has_error) or (status_code is not None and status_code >= 500)
        if latency is not None:
            arm.latencies.append(float(latency))
        if decision in LET_THROUGH and request_id in verdicts:
            arm.reviewed += 1
            arm.overridden += bool(verdicts[request_id] & set(OVERRIDES))
    return StepWindow(rollout.route, rollout.step, weight, started, until, active_since, canary, active)


def _ready(window: StepWindow, settings: CanarySettings) -> str | None:
    """None when the step may be judged, else why it waits."""
    n = window.canary.n
    if n >= settings.step_requests:
        return None
    timed_min = min(MIN_TIMED_REQUESTS, settings.step_requests)
    if settings.step_seconds is not None and window.elapsed_s >= settings.step_seconds:
        if n >= timed_min:
            return None
        return f"waiting: {settings.step_seconds:g} s passed with {n} canary requests (a timed step needs {timed_min})"
    return f"waiting: {n} of {settings.step_requests} canary requests"


def judge_step(window: StepWindow, settings: CanarySettings) -> StepJudgement:
    """Pass, fail or wait (None); `comparisons` holds every number, JSON-safe, for audit rows and reports."""
    canary, active = window.canary, window.active
    comparisons: dict[str, Any] = {"window": window.summary(), "alpha": settings.alpha}
    waiting = _ready(window, settings)
    if waiting:
        return StepJudgement(None, [waiting], comparisons)
    risk = compare_means(canary.risks, active.risks)
    rates = {
        "hold_rate": compare_rates(canary.held, canary.n, active.held, active.n),
        "override_rate": compare_rates(canary.overridden, canary.reviewed, active.overridden, active.reviewed),
        "error_rate": compare_rates(canary.errors, canary.n, active.errors, active.n),
    }
    latency = compare_means(canary.latencies, active.latencies)
    comparisons["risk"] = risk.to_dict()
    comparisons.update({name: result.to_dict() for name, result in rates.items()})
    reasons = []
    if risk.p_value < settings.alpha:
        reasons.append(f"risk: canary mean {risk.canary_mean:.3f} > active {risk.active_mean:.3f} "
                       f"(p={risk.p_value:.2g} < {settings.alpha:g})")  # fmt: skip
    for name, result in rates.items():
        if result.p_value < settings.alpha:
            reasons.append(f"{name.replace('_', ' ')}: canary {result.canary_rate:.3f} > active "
                           f"{result.active_rate:.3f} (p={result.p_value:.2g} < {settings.alpha:g})")  # fmt: skip
    checked = min(len(canary.latencies), len(active.latencies)) >= MIN_LATENCIES and bool(latency.active_p95)
    ratio = latency.canary_p95 / latency.active_p95 if checked else None
    comparisons["latency"] = {**latency.to_dict(), "p95_ratio": None if ratio is None else round(ratio, 6),
                              "max_ratio": settings.max_latency_ratio, "checked": checked}  # fmt: skip
    if ratio is not None and ratio > settings.max_latency_ratio:
        reasons.append(f"latency: canary p95 {latency.canary_p95:.0f} ms is {ratio:.2f}x active's "
                       f"{latency.active_p95:.0f} ms (limit {settings.max_latency_ratio:g}x)")  # fmt: skip
    return StepJudgement(not reasons, reasons, comparisons)


def _lock_rollout(session: Session, rollout: Rollout) -> Rollout:
    """The rollout row as committed now, locked on PostgreSQL (SQLite ignores FOR UPDATE: the CAS guards)."""
    query = sa.select(Rollout).where(Rollout.id == rollout.id).with_for_update()
    return session.scalars(query.execution_options(populate_existing=True)).one()


def advance(
    session: Session, rollout: Rollout, settings: CanarySettings, now: datetime | None = None, actor: str = "loop"
) -> str:
    """Judge the current step once and act on it; return wait | next_step | promoted | rolled_back | failed_step.

    Only decisive judgements (pass or fail) go to `rollout.history` and the audit log (`rollout.<outcome>`):
    a rollout polled every few seconds would otherwise fill both with waits. A rollout that is no longer
    running, or whose step another worker judged first, gives "wait" and changes nothing."""
    now = now or utcnow()
    rollout = _lock_rollout(session, rollout)
    if rollout.status != RolloutStatus.RUNNING:
        return WAIT
    judgement = judge_step(step_window(session, rollout, until=now), settings)
    if judgement.passed is None:
        return WAIT
    step, failures, weights = rollout.step, rollout.failures, list(rollout.weights)
    final = step == len(weights) - 1
    if judgement.passed:
        outcome = PROMOTED if final else NEXT_STEP
    else:
        outcome = ROLLED_BACK if failures + 1 >= settings.max_failures else FAILED_STEP
    entry = {"step": step, "weight": weights[step], "judged_at": now.isoformat(), "passed": judgement.passed,
             "outcome": outcome, "reasons": judgement.reasons, "comparisons": judgement.comparisons}  # fmt: skip
    values: dict[str, Any] = {"history": [*(rollout.history or []), entry]}
    if outcome == NEXT_STEP:
        values.update(step=step + 1, step_started_at=now)
    elif outcome == FAILED_STEP:
        values.update(failures=failures + 1, step_started_at=now)
    elif outcome == PROMOTED:
        values.update(status=RolloutStatus.PROMOTED.value, finished_at=now)
    else:
        values.update(failures=failures + 1, status=RolloutStatus.ROLLED_BACK.value, finished_at=now)
    claimed = session.execute(
        sa.update(Rollout)
        .where(Rollout.id == rollout.id, Rollout.status == RolloutStatus.RUNNING, Rollout.step == step)
        .where(Rollout.failures == failures)
        .values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if claimed != 1:  # another worker judged this step first (SQLite); its judgement stands
        session.expire(rollout)
        return WAIT
    for key, value in values.items():
        set_committed_value(rollout, key, value)
    _apply(session, rollout, outcome, entry, actor)
    audit(session, actor, f"rollout.{outcome}", "rollout", rollout.id, {"route": rollout.route, **entry})
    session.flush()
    return outcome


def _apply(session: Session, rollout: Rollout, outcome: str, entry: dict[str, Any], actor: str) -> None:
    """The routing and lifecycle side of a decisive judgement (the rollout row is already written)."""
    candidate = session.get(Adapter, rollout.candidate_id)
    baseline = None if rollout.baseline_id is None else session.get(Adapter, rollout.baseline_id)
    names = f"{version_label(candidate)} on `{rollout.route}`"
    if outcome == NEXT_STEP:
        share = float(rollout.weights[rollout.step])
        set_weights(session, rollout.route, {rollout.baseline_id: 1.0 - share, candidate.id: share}, actor,
                    f"canary {names}: step {entry['step']} passed; step {rollout.step} at {share:.0%}",
                    entry)  # fmt: skip
    elif outcome == PROMOTED:
        transition(session, candidate, AdapterStatus.ACTIVE, actor, f"canary {names} passed its last step", entry)
        if baseline is None:
            audit(session, actor, "route.base_retired", "route", rollout.route,
                  {"version": BASE, "replaced_by": version_label(candidate), "rollout": rollout.id})  # fmt: skip
        elif baseline.status == AdapterStatus.ACTIVE:
            transition(session, baseline, AdapterStatus.RETIRED, actor, f"replaced by {version_label(candidate)}",
                       {"rollout": rollout.id})  # fmt: skip
        set_weights(session, rollout.route, {candidate.id: 1.0}, actor, f"canary {names} promoted", entry)
    elif outcome == ROLLED_BACK:
        set_weights(session, rollout.route, {rollout.baseline_id: 1.0}, actor,
                    f"canary {names} rolled back: {'; '.join(entry['reasons'])}", entry)  # fmt: skip
        transition(session, candidate, AdapterStatus.ROLLED_BACK, actor,
                   f"step {entry['step']} failed: {'; '.join(entry['reasons'])}", entry)  # fmt: skip


def canary_state(rollout: Rollout) -> float:
    """The metric: the canary's traffic share while running (0 < share <= 1), 1.0 once promoted,
    -1.0 once rolled back."""
    if rollout.status == RolloutStatus.PROMOTED:
        return 1.0
    if rollout.status == RolloutStatus.ROLLED_BACK:
        return -1.0
    return float(rollout.weights[rollout.step])
