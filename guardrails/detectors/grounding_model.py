"""The learned grounding detector: each claim of the answer against its best-matching context, by a model.

Owns turning `guardrails.grounding_model.GroundingModel`'s token probabilities into a result: the
score is the answer's worst claim (a claim is as doubtful as its most doubtful token: one wrong number
makes the claim wrong), `features` carry the mean claim risk and the share of claims flagged, the
unsupported spans are the runs of tokens the model flags (probability >= 0.5), widened to whole words.
Imports `guardrails.grounding_model` and `guardrails.types`.

Bounded: the model reads at most a fixed number of windows of a fixed size (see its module), and
`budget_ms` is a per-check time budget: past it, between two batches, the result is unknown (never a
pass; the calibration weighs what unknown means) with what was found so far as evidence.
No context or an empty answer: unknown.
"""

from __future__ import annotations

import time
from pathlib import Path

from guardrails.grounding_model import GroundingModel, spans_of
from guardrails.types import CheckInput, DetectorResult, clip01, reads

NAME = "grounding_model"
FLAG_AT = 0.5  # a token (and so a claim) at or above this probability is reported unsupported


@reads("question", "answer", "context")
class GroundingModelDetector:
    """`GroundingModelDetector(path)(CheckInput) -> DetectorResult`."""

    name = NAME

    def __init__(self, path: str | Path, budget_ms: float | None = 250.0, model: GroundingModel | None = None) -> None:
        self.model = model or GroundingModel(path)
        self.budget_ms = budget_ms

    def clear_cache(self) -> None:
        self.model.clear_cache()

    def __call__(self, inp: CheckInput) -> DetectorResult:
        if not inp.context or not inp.context.strip():
            return DetectorResult.unknown(NAME, "no context to check the claims against")
        if not inp.answer or not inp.answer.strip():
            return DetectorResult.unknown(NAME, "empty answer")
        deadline = None if self.budget_ms is None else time.perf_counter() + self.budget_ms / 1000
        scored = self.model.score(inp.question, inp.context, inp.answer, deadline)
        claims = [[a, b, round(p, 4)] for a, b, p in scored.claim_probs]
        evidence = {"claims": claims, "windows": scored.windows}
        if not scored.complete:
            return DetectorResult.unknown(
                NAME,
                f"time budget of {self.budget_ms:g} ms spent before all {scored.windows} windows were read",
                **evidence,
            )
        if not scored.claim_probs:
            return DetectorResult.unknown(NAME, "no claim could be read from the answer", **evidence)
        probs = [p for _, _, p in scored.claim_probs]
        evidence["features"] = {
            "mean": clip01(sum(probs) / len(probs)),
            "flagged": clip01(sum(p >= FLAG_AT for p in probs) / len(probs)),
        }
        spans = spans_of(scored.token_probs, inp.answer, FLAG_AT)
        return DetectorResult(NAME, clip01(max(probs)), evidence, spans)
