"""Labels from the review queue: reviewers' verdicts on answers, as rows other packages learn from.

`review_rows` reads every decided review item with its request (question, context, answer) and the
final verdict, in the shape `guardrails.calibration.rows_from_reviews` takes, so the guardrail can
be re-calibrated from what reviewers decided. Imports `core.db`, `core.io` and `core.vocab`.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import Request, ReviewItem
from core.io import last_user_text
from core.vocab import Verdict

# The dataset reviewed answers become training examples in (kind train, source review), one per decided
# item: the review service writes it, the eval suite splits it into test set, holdout and labels.
REVIEWED_DATASET = "reviewed"


def review_rows(session: Session) -> list[dict]:
    """`{question, context, answer, verdict, corrected_answer}` for every decided review item."""
    query = (
        select(ReviewItem, Request)
        .join(Request, Request.id == ReviewItem.request_id)
        .where(ReviewItem.final_verdict.is_not(None))
        .order_by(ReviewItem.decided_at)
    )
    rows = []
    for item, request in session.execute(query):
        stored = request.guardrail_scores or {}
        rows.append({
            "question": last_user_text((request.request_json or {}).get("messages"), request.prompt_text or ""),
            "context": stored.get("context") or "",
            "answer": request.answer_text or "",
            "verdict": item.final_verdict,
            "corrected_answer": item.final_answer if item.final_verdict == Verdict.EDIT else None,
        })  # fmt: skip
    return rows
