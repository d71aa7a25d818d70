"""The loop worker's Prometheus metrics, in a registry of their own (like `gateway.metrics`).

Owns the gauges the closed loop exports: per route and adapter version the online quality, flag,
override and error rates of the latest scored window (`update_from_db`, from
`evalsuite.scoring.window_quality`); per route the drift verdict (domain classifier ROC AUC, drift
0/1, the risk's drift statistic), the guard-reviewer agreement, the canary's share (-1 once rolled
back), the review budget left today and each version's lifecycle status; the loop's jobs by kind and
result, and when each kind last ran. The worker calls the setters after each job.

Imports `core` (loop_settings, db, vocab), `evalsuite.scoring` and prometheus_client.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.orm import Session

from core.db import utcnow
from core.loop_settings import LoopSettings
from core.vocab import AdapterStatus
from evalsuite.scoring import WindowRow, window_quality

LOOKBACK = timedelta(days=1)  # a version without scores this recent drops out of the window gauges
ROLLED_BACK = -1.0


class LoopMetrics:
    """The loop's metrics; expose `registry` (e.g. `prometheus_client.generate_latest(m.registry)`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        version = ["route", "adapter_version"]
        self.quality = Gauge("tunegate_quality", "Share of judged exchanges correct, latest window.", version,
                             registry=r)  # fmt: skip
        self.flag_rate = Gauge("tunegate_flag_rate", "Share held or blocked by the guard, latest window.", version,
                               registry=r)  # fmt: skip
        self.override_rate = Gauge(
            "tunegate_override_rate", "Share of reviewed let-through answers rejected or edited, latest window.",
            version, registry=r,
        )  # fmt: skip
        self.error_rate = Gauge("tunegate_error_rate", "Share of errors (5xx or error), latest window.", version,
                                registry=r)  # fmt: skip
        self.drift_auroc = Gauge("tunegate_drift_auroc", "Domain classifier ROC AUC, current vs reference inputs.",
                                 ["route"], registry=r)  # fmt: skip
        self.drift_detected = Gauge("tunegate_drift_detected", "1 when input drift was detected.", ["route"],
                                    registry=r)  # fmt: skip
        self.risk_drift = Gauge("tunegate_risk_drift_statistic", "Drift statistic of the guard's risk.", ["route"],
                                registry=r)  # fmt: skip
        self.agreement = Gauge("tunegate_guard_agreement", "Guard-reviewer agreement, latest window.", ["route"],
                               registry=r)  # fmt: skip
        self.canary_weight = Gauge("tunegate_canary_weight", "The canary's traffic share; -1 once rolled back.",
                                   version, registry=r)  # fmt: skip
        self.budget_left = Gauge("tunegate_review_budget_left", "Priority review items left today.", ["route"],
                                 registry=r)  # fmt: skip
        self.adapter_status = Gauge("tunegate_adapter_status", "1 for the version's current lifecycle status.",
                                    [*version, "status"], registry=r)  # fmt: skip
        self.jobs = Counter("tunegate_loop_jobs", "Loop jobs run, by kind and result.", ["kind", "result"],
                            registry=r)  # fmt: skip
        self.last_run = Gauge("tunegate_loop_last_run_timestamp_seconds", "When a loop job of this kind last ran.",
                              ["kind"], registry=r)  # fmt: skip

    # --- from the database ---------------------------------------------------------------------------

    def update_from_db(self, session: Session, settings: LoopSettings, now: datetime | None = None) -> list[WindowRow]:
        """Set the four window gauges from each (route, version)'s latest window of the last day; a rate
        without data (no judged or reviewed exchange) is left unset. Returns the rows used."""
        now = now or utcnow()
        latest: dict[tuple[str, str], WindowRow] = {}
        for row in window_quality(session, since=now - max(LOOKBACK, timedelta(seconds=settings.window_s))):
            key = (row.route, row.adapter_version)
            if key not in latest or row.window_start > latest[key].window_start:
                latest[key] = row
        gauges = ((self.quality, "quality"), (self.flag_rate, "flag_rate"), (self.override_rate, "override_rate"),
                  (self.error_rate, "error_rate"))  # fmt: skip
        for gauge, _ in gauges:
            gauge.clear()  # versions gone quiet drop out
        for (route, version), row in latest.items():
            for gauge, attribute in gauges:
                value = getattr(row, attribute)
                if value is not None:
                    gauge.labels(route, version).set(value)
        return list(latest.values())

    # --- set by the worker ---------------------------------------------------------------------------

    def set_drift(self, route: str, auroc: float | None, detected: bool, risk_statistic: float | None = None) -> None:
        if auroc is not None and math.isfinite(auroc):
            self.drift_auroc.labels(route).set(auroc)
        self.drift_detected.labels(route).set(1.0 if detected else 0.0)
        if risk_statistic is not None and math.isfinite(risk_statistic):
            self.risk_drift.labels(route).set(risk_statistic)

    def set_agreement(self, route: str, agreement: float | None) -> None:
        if agreement is not None and math.isfinite(agreement):
            self.agreement.labels(route).set(agreement)

    def set_canary(self, route: str, adapter_version: str, weight: float) -> None:
        """The canary's share now (0..1), or `ROLLED_BACK` (-1)."""
        self.canary_weight.labels(route, adapter_version).set(weight)

    def canary_rolled_back(self, route: str, adapter_version: str) -> None:
        self.set_canary(route, adapter_version, ROLLED_BACK)

    def set_review_budget_left(self, route: str, left: int) -> None:
        self.budget_left.labels(route).set(left)

    def set_adapter_status(self, route: str, adapter_version: str, status: str) -> None:
        """1 for `status`; the version's other statuses are removed, so one series per version is 1."""
        for other in AdapterStatus:
            if other.value != status:
                try:
                    self.adapter_status.remove(route, adapter_version, other.value)
                except KeyError:
                    pass
        self.adapter_status.labels(route, adapter_version, status).set(1.0)

    def job_finished(self, kind: str, result: str, at: float | None = None) -> None:
        """Count one loop job (`result`: e.g. succeeded / failed / skipped) and stamp its kind's last run."""
        self.jobs.labels(kind, result).inc()
        self.last_run.labels(kind).set(time.time() if at is None else at)
