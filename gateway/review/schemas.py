"""What the review API accepts and returns: separate models for what a reviewer sends (`DecisionCreate`,
strict), what a reviewer sees (`ReviewItemPublic`, `QueuePublic`, `DecisionResult`, `AgreementRow`) and
what the held client gets back (`ReviewOutcome`). Nothing here is a database row; the service builds them.
Verdicts, statuses and reasons are `core.vocab`'s StrEnums (sent and shown as their values).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.vocab import ReviewReason, ReviewStatus, Verdict


class ReviewItemPublic(BaseModel):
    """One item as the reviewer's page shows it."""

    id: str
    status: ReviewStatus
    reason: ReviewReason = Field(description="`held`: the client waits for this verdict.")
    route: str
    question: str = Field(description="The last user message (or the completion prompt).")
    prompt: str | None = Field(None, description="The whole conversation as logged (`role: text` lines).")
    context: str | None = Field(None, description="The passages the answer was checked against.")
    answer: str | None = Field(None, description="The model's answer, as the client would have received it.")
    unsupported_spans: list[tuple[int, int]] = Field(
        default_factory=list,
        description="Half-open [start, end) character offsets (Unicode code points) into `answer` "
        "that the guardrails found unsupported by the context.",
    )
    scores: dict[str, Any] = Field(default_factory=dict, description="Detector name -> score.")
    risk: float | None = Field(None, description="The combined risk in [0, 1].")
    created_at: datetime
    claimed_by: str | None = None
    lease_expires_at: datetime | None = None
    hold_expires_at: datetime | None = Field(None, description="When a held item falls back (`review.hold_fallback`).")
    required_verdicts: int
    verdicts: int = Field(description="Verdicts given so far.")


class QueuePublic(BaseModel):
    pending: int = Field(description="Items waiting for a reviewer (including claims whose lease ran out).")
    claimed: int = Field(description="Items a reviewer holds under a live lease.")
    items: list[ReviewItemPublic] = Field(description="The next items in claim order (not claimed by this call).")


class DecisionCreate(BaseModel):
    """A reviewer's verdict on the item they hold."""

    model_config = ConfigDict(extra="forbid")

    verdict: Verdict
    corrected_answer: str | None = Field(None, max_length=100_000, description="Required when `verdict` is `edit`.")
    reason: str = Field("", max_length=2_000, description="Why; required for `reject` and `edit`.")

    @model_validator(mode="after")
    def _edit_needs_an_answer(self) -> DecisionCreate:
        problem = decision_problem(self.verdict, self.corrected_answer, self.reason)
        if problem:
            raise ValueError(problem[1])
        return self


def decision_problem(verdict: str, corrected_answer: str | None, reason: str) -> tuple[str, str] | None:
    """What is wrong with a decision, as (parameter, message), or None; shared by the request model
    and the service."""
    if verdict == Verdict.EDIT and not (corrected_answer or "").strip():
        return (
            "corrected_answer",
            "`corrected_answer` is required when `verdict` is `edit`: send the answer as it should read",
        )
    if verdict != Verdict.EDIT and corrected_answer is not None:
        return (
            "corrected_answer",
            f"`corrected_answer` is only for `verdict` `edit` (this one is `{verdict}`); leave it out",
        )
    if verdict in (Verdict.REJECT, Verdict.EDIT) and not reason.strip():
        return "reason", f"`reason` is required for `{verdict}`: say briefly what was wrong with the answer"
    return None


class DecisionResult(BaseModel):
    """The item after a verdict: still waiting for more verdicts (overlap), or decided."""

    id: str
    status: ReviewStatus
    verdicts: int
    required_verdicts: int
    final_verdict: Verdict | None = None
    final_answer: str | None = None


class ReviewOutcome(BaseModel):
    """What the held client gets from `GET /v1/reviews/{id}` (and the webhook receives)."""

    id: str
    object: Literal["review.outcome"] = "review.outcome"
    request_id: str
    reason: ReviewReason
    status: ReviewStatus
    done: bool = Field(description="True once the outcome is final (`decided` or `expired`).")
    verdict: Verdict | None = Field(None, description="The final verdict; None while waiting or when expired.")
    answer: str | None = Field(
        None, description="The answer to deliver: the approved or corrected one, the released original, or None."
    )
    message: str
    created_at: datetime
    decided_at: datetime | None = None
    hold_expires_at: datetime | None = None


class AgreementRow(BaseModel):
    reviewer_a: str
    reviewer_b: str
    n: int = Field(description="Items both reviewers judged.")
    observed_agreement: float = Field(description="Share of those items with the same verdict.")
    kappa: float | None = Field(description="Cohen's kappa; None when undefined (e.g. one verdict only).")
