"""Guardrails on the request path: score an answer, apply the route's policy, hold what is doubtful.

For each answer the gateway gathers what the detectors need (the question, the context the client
sent in `context`/`documents` or else passages retrieved from the route's knowledge base, the
answer's token logprobs, extra samples when self-consistency is on), runs the calibrated guard in
a worker thread, and maps the risk through the route's policy (`routes.<alias>.policy`, else
`guardrails.policy`) to allow / annotate / hold / block. Held answers, and a sample of allowed
ones, go to the review queue in the same transaction as their traffic-log row, before the client
hears back. Imports `guardrails`, `tunegate` and the review service.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.settings import PolicySettings, Settings
from guardrails.guard import Guard, calibration_path_for
from guardrails.policy import decide
from guardrails.retrieval import KnowledgeBase
from guardrails.types import CheckInput, DetectorResult


@dataclass
class Assessment:
    risk: float
    decision: str  # allow | annotate | hold | block
    results: list[DetectorResult]
    context: str | None
    seconds: float
    unsupported_spans: list[tuple[int, int]] = field(default_factory=list)

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
        """What an `annotate` response carries for the client (`tunegate` field)."""
        return {
            "risk": round(self.risk, 4),
            "decision": self.decision,
            "scores": {k: None if v is None else round(v, 4) for k, v in self.scores().items()},
            "unsupported_spans": [list(s) for s in self.unsupported_spans],
        }


def request_context(extra: dict) -> str | None:
    """The grounding context a client sent: `context` (text or list) or `documents` (texts or {text})."""
    for name in ("context", "documents"):
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
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled = settings.guardrails.enabled
        path = calibration_path_for(settings.guardrails, settings.var_dir)
        self.guard = Guard(settings.guardrails, path if Path(path).exists() else None) if self.enabled else None
        self._knowledge: dict[str, KnowledgeBase] = {}
        self._random = random.Random()

    def policy(self, route: str) -> PolicySettings:
        route_settings = self.settings.routes.get(route)
        return (route_settings.policy if route_settings and route_settings.policy else None) or (
            self.settings.guardrails.policy
        )

    def may_withhold(self, route: str) -> bool:
        """Whether this route's answers can be held or blocked: then streams must be buffered."""
        policy = self.policy(route)
        return self.enabled and (policy.hold_at <= 1 or policy.block_at <= 1)

    def wants_logprobs(self) -> bool:
        return self.enabled and "uncertainty" in self.settings.guardrails.detectors

    def sample_for_review(self) -> bool:
        return self._random.random() < self.settings.review.sample_rate

    def _retrieve(self, route: str, question: str) -> str | None:
        route_settings = self.settings.routes.get(route)
        if route_settings is None or route_settings.knowledge_base is None:
            return None
        kb = self._knowledge.get(route)
        if kb is None:
            kb = self._knowledge[route] = KnowledgeBase.from_jsonl(route_settings.knowledge_base)
        return kb.context_for(question)

    def _check(self, route: str, check: CheckInput) -> Assessment:
        started = time.perf_counter()
        if check.context is None:
            check = dataclasses.replace(check, context=self._retrieve(route, check.question))
        verdict = self.guard.check(check)
        return Assessment(
            risk=verdict.risk,
            decision=decide(verdict.risk, self.policy(route)),
            results=list(verdict.results.values()),
            context=check.context,
            seconds=time.perf_counter() - started,
            unsupported_spans=verdict.unsupported_spans(),
        )

    async def assess(self, route: str, check: CheckInput) -> Assessment | None:
        if not self.enabled:
            return None
        return await asyncio.to_thread(self._check, route, check)
