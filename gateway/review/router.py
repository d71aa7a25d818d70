"""Routes of the review API and the reviewer's page. Thin: each route names the role it admits, runs one
`ReviewService` method in a worker thread and returns its result; errors are `GatewayError`s.

| route | roles | what |
|---|---|---|
| `POST /v1/review/claim` | reviewer | lease the next item (`ReviewItemPublic`), or 204 when the queue is empty |
| `POST /v1/review/items/{id}/decision` | reviewer | approve / reject / edit the item you hold (409 without the lease) |
| `GET /v1/review/queue` | reviewer | counts and the next items, without claiming |
| `GET /v1/review/agreement` | reviewer | Cohen's kappa per reviewer pair |
| `GET /v1/reviews/{id}` | app | the outcome of a held answer: 202 while waiting, 200 once final |
| `GET /review` | none | the reviewer's page (asks for a reviewer key; holds no secret itself) |

A reviewer is identified by the name of their key (`tunegate keys create alice --role reviewer`).
"""

from __future__ import annotations

import asyncio
from functools import cache
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import HTMLResponse

from core.vocab import Role
from gateway.deps import AppCaller, ReviewerCaller, get_review
from gateway.review.schemas import (
    AgreementRow,
    DecisionCreate,
    DecisionResult,
    QueuePublic,
    ReviewItemPublic,
    ReviewOutcome,
)
from gateway.review.service import ReviewService

router = APIRouter(tags=["review"])
PAGE = Path(__file__).with_name("page.html")
POLL_AFTER_S = 5
# The page is self-contained: no request may leave for another origin, and no site may frame it.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


Review = Annotated[ReviewService, Depends(get_review)]


@router.post(
    "/v1/review/claim",
    response_model=ReviewItemPublic,
    responses={204: {"description": "The queue is empty"}},
    summary="Lease the next item to review",
)
async def claim(caller: ReviewerCaller, review: Review):
    item = await asyncio.to_thread(review.claim, caller.name)
    return Response(status_code=204) if item is None else item


@router.post("/v1/review/items/{item_id}/decision", summary="Give a verdict on the item you hold")
async def decide(item_id: str, body: DecisionCreate, caller: ReviewerCaller, review: Review) -> DecisionResult:
    return await asyncio.to_thread(
        review.decide, item_id, caller.name, body.verdict, body.corrected_answer, body.reason
    )


@router.get("/v1/review/queue", summary="Queue counts and the next items (nothing is claimed)")
async def queue(_: ReviewerCaller, review: Review, limit: Annotated[int, Query(ge=0, le=200)] = 20) -> QueuePublic:
    return await asyncio.to_thread(review.queue, limit)


@router.get("/v1/review/agreement", summary="Inter-reviewer agreement (Cohen's kappa per pair)")
async def agreement(_: ReviewerCaller, review: Review) -> list[AgreementRow]:
    return await asyncio.to_thread(review.agreement)


@router.get(
    "/v1/reviews/{item_id}",
    responses={202: {"model": ReviewOutcome, "description": "Still waiting for a reviewer"}},
    summary="The outcome of a held answer",
)
async def outcome(item_id: str, caller: AppCaller, review: Review, response: Response) -> ReviewOutcome:
    owner = None if caller.role == Role.ADMIN else caller.key_id  # an app key reads only its own requests
    result = await asyncio.to_thread(review.outcome, item_id, owner)
    if not result.done:
        response.status_code = 202
        response.headers["Retry-After"] = str(POLL_AFTER_S)
    return result


@cache
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


@router.get("/review", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_page(), headers=PAGE_HEADERS)
