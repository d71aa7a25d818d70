"""Routing truth: which adapter versions a route sends traffic to, and where each version stands.

The database holds it, so every gateway replica and every worker sees the same thing: `aliases` (a
route, i.e. a public model name) with weighted `alias_targets` (an adapter version, or NULL for the
base model), and each adapter version's `status`. Only targets whose version is `canary` or `active`
(or the base model) get traffic; `transition` is the only way a status changes, and it refuses any
move the lifecycle does not have::

    candidate -> gated -> canary -> active -> retired
         \\-> rejected   \\-> rejected  \\-> rolled_back

Every transition and every change of weights is an `audit_log` row in the same transaction: what,
who, why, and the evidence (the gate's numbers, the canary step's comparison). The settings file's
`routes` seed the tables for a route the database does not know yet (`seed_routes`); after that the
database is the truth and the file's targets are ignored.

Imports `core.db`, `core.settings` and `core.vocab`. Functions flush, never commit: the caller's
transaction decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import Adapter, Alias, AliasTarget, AuditLog, LoopState, utcnow
from core.settings import RouteSettings
from core.vocab import AdapterStatus

S = AdapterStatus
TRANSITIONS: dict[AdapterStatus, frozenset[AdapterStatus]] = {
    S.CANDIDATE: frozenset({S.GATED, S.REJECTED}),
    S.GATED: frozenset({S.CANARY, S.REJECTED}),
    S.CANARY: frozenset({S.ACTIVE, S.ROLLED_BACK}),
    S.ACTIVE: frozenset({S.RETIRED}),
    S.RETIRED: frozenset(),
    S.REJECTED: frozenset(),
    S.ROLLED_BACK: frozenset(),
}
SERVING = frozenset({S.CANARY, S.ACTIVE})
BASE = "base"  # how the base model (a target without an adapter) is named in versions and audit rows


class LifecycleError(ValueError):
    """A status change the lifecycle does not allow, or a route or version that does not exist."""


@dataclass(frozen=True)
class RouteTarget:
    """One weighted destination of a route, as the gateway and the eval suite read it."""

    adapter_id: int | None  # None: the base model
    name: str | None
    version: int | None
    status: str  # the adapter's status; `active` for the base model
    weight: float

    @property
    def label(self) -> str:
        """`base` or `support/v3`: how metrics, logs and reports name the version."""
        return BASE if self.adapter_id is None else f"{self.name}/v{self.version}"

    @property
    def serving(self) -> bool:
        return self.weight > 0 and self.status in SERVING


def version_label(adapter: Adapter | None) -> str:
    return BASE if adapter is None else f"{adapter.name}/v{adapter.version}"


def audit(session: Session, actor: str, action: str, object_type: str, object_id: Any, detail: dict) -> None:
    session.add(AuditLog(actor=actor, action=action, object_type=object_type, object_id=str(object_id), detail=detail))


def transition(
    session: Session,
    adapter: Adapter,
    to: AdapterStatus,
    actor: str,
    why: str,
    evidence: Mapping[str, Any] | None = None,
) -> None:
    """Move `adapter` to `to` and write the audit row; `LifecycleError` for a move the graph lacks."""
    current = AdapterStatus(adapter.status)
    if to not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing (a final state)"
        raise LifecycleError(
            f"{version_label(adapter)} is {current}; it can move to {allowed}, not {to}"
        )
    adapter.status = to
    audit(session, actor, f"adapter.{to}", "adapter", adapter.id,
          {"version": version_label(adapter), "from": current.value, "to": to.value, "why": why,
           "evidence": dict(evidence or {})})  # fmt: skip
    session.flush()


def route_table(session: Session) -> dict[str, list[RouteTarget]]:
    """Every route in the database with all its targets (serving or not), in target order."""
    rows = session.execute(
        sa.select(Alias.name, AliasTarget.adapter_id, Adapter.name, Adapter.version, Adapter.status, AliasTarget.weight)
        .join(AliasTarget, AliasTarget.alias_id == Alias.id, isouter=True)
        .join(Adapter, Adapter.id == AliasTarget.adapter_id, isouter=True)
        .order_by(Alias.name, AliasTarget.id)
    ).all()
    table: dict[str, list[RouteTarget]] = {}
    for route, adapter_id, name, version, status, weight in rows:
        targets = table.setdefault(route, [])
        if weight is not None:
            targets.append(RouteTarget(adapter_id, name, version, status or S.ACTIVE, float(weight)))
    return table


def serving_targets(targets: list[RouteTarget]) -> list[RouteTarget]:
    return [t for t in targets if t.serving]


def active_target(targets: list[RouteTarget]) -> RouteTarget | None:
    """The route's active version (the base model counts as active): what a candidate is compared with."""
    return next((t for t in targets if t.status == S.ACTIVE and t.weight > 0), None)


def _alias(session: Session, route: str) -> Alias:
    alias = session.scalar(sa.select(Alias).where(Alias.name == route))
    if alias is None:
        raise LifecycleError(f"route `{route}` is not in the database (seed it from the settings first)")
    return alias


def set_weights(
    session: Session, route: str, weights: Mapping[int | None, float], actor: str, why: str,
    evidence: Mapping[str, Any] | None = None,
) -> None:  # fmt: skip
    """Give the route exactly these targets (adapter id, None for the base model -> weight) and audit it."""
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise LifecycleError(f"weights {dict(weights)} must be >= 0 and add up to more than 0")
    alias = _alias(session, route)
    before = {t.adapter_id: t.weight for t in alias.targets}
    alias.targets.clear()
    session.flush()
    alias.targets.extend(AliasTarget(adapter_id=a, weight=float(w)) for a, w in weights.items())
    alias.updated_at = utcnow()
    session.flush()
    audit(session, actor, "route.weights", "route", route,
          {"before": {str(k): v for k, v in before.items()}, "after": {str(k): v for k, v in weights.items()},
           "why": why, "evidence": dict(evidence or {})})  # fmt: skip


def _resolve_seed(session: Session, adapter: str, version: str) -> Adapter | None:
    query = sa.select(Adapter).where(Adapter.name == adapter, Adapter.servable.is_(True))
    if version == "latest":  # the newest servable version no check turned down
        query = query.where(Adapter.status.not_in([S.REJECTED, S.ROLLED_BACK]))
        query = query.order_by(Adapter.version.desc()).limit(1)
    else:
        query = query.where(Adapter.version == int(version.removeprefix("v")))
    return session.scalar(query)


def seed_routes(session: Session, routes: Mapping[str, RouteSettings]) -> list[str]:
    """Create the alias rows of settings routes the database does not know yet; return their names.

    A route whose adapter is not registered yet is left for a later call. The adapters it names become
    `active` (the operator chose them in the settings), with an audit row saying so. Safe when several
    processes seed at once: a lost race is an IntegrityError, rolled back to a savepoint and ignored.
    """
    known = set(session.scalars(sa.select(Alias.name)))
    seeded = []
    for route, spec in routes.items():
        if route in known:
            continue
        picked: list[tuple[Adapter | None, float]] = []
        for target in spec.targets:
            adapter = None if target.adapter is None else _resolve_seed(session, target.adapter, target.version)
            if target.adapter is not None and adapter is None:
                break
            picked.append((adapter, target.weight))
        else:
            try:
                with session.begin_nested():
                    alias = Alias(name=route, description=spec.description)
                    alias.targets = [AliasTarget(adapter_id=a.id if a else None, weight=w) for a, w in picked]
                    session.add(alias)
                    for adapter, _ in picked:
                        if adapter is not None and adapter.status != S.ACTIVE:
                            adapter.status = S.ACTIVE
                            why = f"route `{route}` names it in the settings"
                            detail = {"version": version_label(adapter), "why": why}
                            audit(session, "settings", "adapter.active", "adapter", adapter.id, detail)
                    audit(session, "settings", "route.seeded", "route", route,
                          {"targets": {version_label(a): w for a, w in picked}})  # fmt: skip
            except IntegrityError:
                continue  # another process seeded it first
            seeded.append(route)
    return seeded


def is_paused(session: Session, route: str) -> bool:
    state = session.get(LoopState, route)
    return bool(state and state.paused)


def set_paused(session: Session, route: str, paused: bool, actor: str, reason: str = "") -> None:
    state = session.get(LoopState, route)
    if state is None:
        session.add(LoopState(route=route, paused=paused, reason=reason or None))
    else:
        state.paused, state.reason = paused, reason or None
    audit(session, actor, "loop.paused" if paused else "loop.resumed", "route", route, {"reason": reason})
    session.flush()
