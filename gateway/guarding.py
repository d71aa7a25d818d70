"""Guardrails on the request path: the guard is asked twice per request, for a plan and for a verdict.

`GuardService.plan(route, sampling)` says, before vLLM is called, what the route's guardrails need:
token logprobs (an active detector reads them), extra samples (self-consistency, sampling requests
only), whether a stream must be buffered and judged before a byte is sent (the route's policy can
hold or block), and whether this answer is also sampled for review (`review.sample_rate`). It reads
cheap properties of the calibrated `guardrails.guard.Guard` (`needs_logprobs`, `needs_samples`).

`GuardService.verdict(route, plan, check)` scores the answer: the context the client sent in
`context`/`documents`, else passages retrieved from the route's knowledge base; the calibrated risk
(in a worker thread); the route's policy (`routes.<alias>.policy`, else `guardrails.policy`) ->
allow / annotate / hold / block; and whether the answer goes to review (`held` or `sampled`). A
response with several answers (`n` > 1, a list of prompts) has each judged; `worst` picks the verdict
that decides for the whole response (block > hold > annotate > allow; the higher risk on a tie).
Imports `guardrails` and `core`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.settings import PolicySettings, Settings
from core.vocab import Decision, ReviewReason
from guardrails.guard import Guard, calibration_path_for
from guardrails.policy import decide
from guardrails.retrieval import KnowledgeBase
from guardrails.types import CheckInput, DetectorResult

CONTEXT_FIELDS = ("context", "documents")  # tunegate's request fields; never forwarded to vLLM
SEVERITY = {Decision.ALLOW: 0, Decision.ANNOTATE: 1, Decision.HOLD: 2, Decision.BLOCK: 3}

log = logging.getLogger("tunegate.gateway")


@dataclass(frozen=True)
class Plan:
    """What the guardrails need of one request, decided before vLLM is asked (all off: no guardrails)."""

    logprobs: bool = False  # ask vLLM for the answer's token logprobs
    samples: int = 0  # extra samples to ask vLLM for in the same call (self-consistency)
    buffer: bool = False  # the route can hold or block: judge a stream before sending any of it
    sample_for_review: bool = False  # an allowed or annotated answer also goes to review


@dataclass
class Assessment:
    """The verdict on one answer: risk, the policy's decision, the evidence, and the review it needs."""

    risk: float
    decision: Decision
    results: list[DetectorResult]
    context: str | None
    seconds: float
    unsupported_spans: list[tuple[int, int]] = field(default_factory=list)
    review: ReviewReason | None = None  # held: the client waits for a reviewer; sampled: it does not

    def scores(self) -> dict[str, float | None]:
        return {r.name: r.score for r in self.results}

    def stored(self) -> dict:
        """What the traffic log and the reviewer's page keep (`requests.guardrail_scores`)."""
        return {
            "scores": self.scores(),
            "context": self.context,
            "unsupported_spans": [list(s) for s in self.unsupported_spans],
            "evidence": {r.name: r.evidence for r in self.results},
        }

    def public(self) -> dict:
        """What an annotated (or blocked) response carries for the client (`tunegate` field)."""
        return {
            "risk": round(self.risk, 4),
            "decision": self.decision,
            "scores": {k: None if v is None else round(v, 4) for k, v in self.scores().items()},
            "unsupported_spans": [list(s) for s in self.unsupported_spans],
        }


def worst(assessments: list[Assessment | None]) -> int | None:
    """The position of the verdict that decides for a whole response (None: no guardrails)."""
    judged = [(SEVERITY[a.decision], a.risk, -i) for i, a in enumerate(assessments) if a is not None]
    return -max(judged)[2] if judged else None


def request_context(extra: dict) -> str | None:
    """The grounding context a client sent: `context` (text or list) or `documents` (texts or {text})."""
    for name in CONTEXT_FIELDS:
        value = extra.get(name)
        if not value:
            continue
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            parts = [v if isinstance(v, str) else str(v.get("text", "")) for v in value if v]
            return "\n".join(p for p in parts if p) or None
    return None


class GuardService:
    """The calibrated guard (None when `guardrails.enabled` is false), the policies and knowledge bases."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.calibration_path = Path(calibration_path_for(settings.guardrails, settings.var_dir))
        self._calibration_stamp = self._stamp()
        self.guard = self._build() if settings.guardrails.enabled else None
        self._knowledge: dict[str, KnowledgeBase] = {}
        self._random = random.Random()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.calibration_path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _build(self) -> Guard:
        path = self.calibration_path if self.calibration_path.exists() else None
        return Guard(self.settings.guardrails, path)

    def reload_if_changed(self) -> bool:
        """Take a new calibration file (the eval suite's re-fit writes one, atomically) without a restart.
        Called from the gateway's housekeeping, off the event loop; a broken file keeps the current guard."""
        stamp = self._stamp()
        if self.guard is None or stamp == self._calibration_stamp:
            return False
        self._calibration_stamp = stamp
        try:
            self.guard = self._build()  # one assignment: requests in flight keep the guard they started with
        except Exception:
            log.exception("the new calibration %s could not be loaded; keeping the current one", self.calibration_path)
            return False
        log.info("reloaded the guard's calibration from %s", self.calibration_path)
        return True

    def policy(self, route: str) -> PolicySettings:
        route_settings = self.settings.routes.get(route)
        return (route_settings.policy if route_settings and route_settings.policy else None) or (
            self.settings.guardrails.policy
        )

    def plan(self, route: str, sampling: bool) -> Plan:
        """What this request must ask of vLLM and how to answer it; `sampling`: temperature > 0
        (greedy samples would all agree, so none are asked for then)."""
        if self.guard is None:
            return Plan()
        policy = self.policy(route)
        samples = self.settings.guardrails.consistency_samples
        return Plan(
            logprobs=self.guard.needs_logprobs,
            samples=samples if self.guard.needs_samples and sampling else 0,
            buffer=policy.hold_at <= 1 or policy.block_at <= 1,
            sample_for_review=self._random.random() < self.settings.review.sample_rate,
        )

    async def verdict(self, route: str, plan: Plan, check: CheckInput) -> Assessment | None:
        """Score the answer and apply the route's policy (None when the guardrails are off)."""
        if self.guard is None:
            return None
        return await asyncio.to_thread(self._check, route, plan, check)

    def _retrieve(self, route: str, question: str) -> str | None:
        route_settings = self.settings.routes.get(route)
        if route_settings is None or route_settings.knowledge_base is None:
            return None
        kb = self._knowledge.get(route)
        if kb is None:
            kb = self._knowledge[route] = KnowledgeBase.from_jsonl(route_settings.knowledge_base)
        return kb.context_for(question)

    def _check(self, route: str, plan: Plan, check: CheckInput) -> Assessment:
        started = time.perf_counter()
        if check.context is None:
            check = dataclasses.replace(check, context=self._retrieve(route, check.question))
        report = self.guard.check(check)
        decision = decide(report.risk, self.policy(route))
        if decision == Decision.HOLD:
            review = ReviewReason.HELD
        elif decision != Decision.BLOCK and plan.sample_for_review:
            review = ReviewReason.SAMPLED
        else:
            review = None
        return Assessment(
            risk=report.risk,
            decision=decision,
            results=list(report.results.values()),
            context=check.context,
            seconds=time.perf_counter() - started,
            unsupported_spans=report.unsupported_spans(),
            review=review,
        )
