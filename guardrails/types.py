"""The two types every guardrail speaks: `CheckInput` (what is checked) and `DetectorResult` (what a
detector found). A detector is any callable `CheckInput -> DetectorResult`.

Owns the contract that a score is a hallucination risk in [0, 1] or `None` for "unknown" (never NaN)
and that unsupported spans are character offsets into the answer; and how a detector declares which
`CheckInput` fields it reads (`@reads("token_logprobs", ...)`, read back by `fields_read`), so the
guard can tell the gateway what to ask vLLM for. Imports the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar


@dataclass(frozen=True)
class CheckInput:
    """One answer to check, with everything the gateway knows about how it was produced."""

    question: str
    answer: str
    context: str | None = None  # passages the answer must be grounded in (client-supplied or retrieved)
    token_logprobs: list[float] | None = None  # the answer's sampled-token logprobs, as vLLM returns them
    top_logprobs: list[dict[str, float]] | None = None  # per answer token: alternative token -> logprob
    samples: list[str] = field(default_factory=list)  # extra samples of the same request (self-consistency)


@dataclass(frozen=True)
class DetectorResult:
    """What one detector found: a risk in [0, 1] (`None`: the detector could not tell), its evidence
    (JSON-serialisable), and the parts of the answer it found unsupported as `(start, end)` offsets."""

    name: str
    score: float | None
    evidence: dict[str, Any] = field(default_factory=dict)
    unsupported_spans: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.score is None:
            return
        if isinstance(self.score, bool) or not isinstance(self.score, int | float) or math.isnan(self.score):
            raise ValueError(f"detector `{self.name}` returned score {self.score!r}; use None for unknown, never NaN")
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"detector `{self.name}` returned score {self.score}; scores must lie in [0, 1]")
        object.__setattr__(self, "score", float(self.score))

    @property
    def known(self) -> bool:
        return self.score is not None

    @classmethod
    def unknown(cls, name: str, reason: str, **evidence: Any) -> DetectorResult:
        """A result that says explicitly "I cannot tell" and why (never a pass)."""
        return cls(name, None, {"reason": reason, **evidence})

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "score": self.score,
            "evidence": self.evidence,
            "unsupported_spans": [list(s) for s in self.unsupported_spans],
        }


Detector = Callable[[CheckInput], DetectorResult]
D = TypeVar("D")
LOGPROB_FIELDS = frozenset({"token_logprobs", "top_logprobs"})  # what vLLM returns only when asked


def reads(*fields: str) -> Callable[[D], D]:
    """Declare the `CheckInput` fields a detector (function or class) reads: `@reads("samples")`."""
    unknown = sorted(set(fields) - set(CheckInput.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{unknown} are not CheckInput fields")

    def mark(detector: D) -> D:
        detector.reads = frozenset(fields)  # type: ignore[attr-defined]
        return detector

    return mark


def fields_read(detector: Detector) -> frozenset[str]:
    """The fields a detector declared with `@reads` (none declared: none assumed)."""
    return frozenset(getattr(detector, "reads", ()))


def clip01(x: float) -> float:
    """`x` clipped to [0, 1]; NaN is a bug in the caller, not a score."""
    if math.isnan(x):
        raise ValueError("a NaN reached a score; return DetectorResult.unknown(...) instead")
    return min(1.0, max(0.0, float(x)))
