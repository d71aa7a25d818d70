"""Labels from the review queue: reviewers' verdicts on answers, as rows other packages learn from.

`review_rows` reads every decided review item with its request (question, context, answer) and the
final verdict, in the shape `guardrails.calibration.rows_from_reviews` takes, so the guardrail can
be re-calibrated from what reviewers decided. Imports `tunegate.db` only.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunegate.db import Request, ReviewItem


def _question(request_json: dict | None, prompt_text: str | None) -> str:
    messages = (request_json or {}).get("messages") or []
    users = [m.get("content") for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    return users[-1] if users else (prompt_text or "")


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
            "question": _question(request.request_json, request.prompt_text),
            "context": stored.get("context") or "",
            "answer": request.answer_text or "",
            "verdict": item.final_verdict,
            "corrected_answer": item.final_answer if item.final_verdict == "edit" else None,
        })  # fmt: skip
    return rows
