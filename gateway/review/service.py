"""The review queue: held and sampled answers wait here for human verdicts.

Lifecycle of an item (`review_items.status`)::

    hold() -> pending -- claim() --> claimed -- decide() --> pending (overlap: fewer than k verdicts)
                 ^                      |                  \\-> decided (k verdicts: final verdict, answer)
                 +-- lease runs out ----+
    a held item not decided within `review.hold_timeout_s` -> expired (`review.hold_fallback`)

* `claim` hands each item to one reviewer at a time under a lease (`review.lease_s`), through
  `core.db.leases.claim_next` (the jobs queue's too): on PostgreSQL `SELECT ... FOR UPDATE SKIP
  LOCKED`, on SQLite a conditional UPDATE whose row count decides who won. Held items come before
  sampled ones (a client is waiting for them), oldest first; a reviewer is never handed an item
  they already judged.
* A reviewer holds at most `review.max_leases_per_reviewer` live leases (claims by one reviewer are
  serialised: an advisory lock on PostgreSQL, a recount under the write lock on SQLite); one beyond is refused
  (`Conflict`, 409, code `too_many_leases`), so one reviewer cannot lock the queue away from the others.
* `decide` is accepted only from the reviewer whose lease is live (else `Conflict`, 409). With
  overlap (`review.required_verdicts` = k > 1) the item goes back to the queue until it has k
  verdicts; then `gateway.review.outcomes` decides it: the majority wins, a tie going to the more
  conservative verdict (reject > edit > approve), and an edit's answer is that of the latest edit.
  Approved and corrected answers become training examples (dataset `reviewed`, kind train, source
  `review`).
* Expiry is applied lazily (`outcome` of an overdue item) and by `expire_overdue()`, which `claim`
  also runs first; each item expires exactly once, whoever gets there first.
* Every step writes an `audit_log` row in the same transaction as the change it records. The
  webhook (`review.webhook_url`) receives the `ReviewOutcome` of every held item that is decided or
  expires, from a background thread (best effort: failures are logged, never raised), signed with
  `secret_key` (HMAC-SHA256; `outcomes.sign` says how a receiver checks it).

Where the page finds what the guardrails saw: `requests.guardrail_scores` of a held request is::

    {
      "scores": {"grounding": 0.31, "uncertainty": 0.72, ...},   # detector name -> score
      "context": "passage text the answer was checked against",  # or null
      "unsupported_spans": [[12, 40], ...]                        # [start, end) into answer_text,
    }                                                             #   in Unicode code points

Other keys the guardrails put there are kept as they are.

Every method is synchronous (SQLAlchemy sessions); routes run them with `asyncio.to_thread`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import SecretStr
from sqlalchemy import and_, case, exists, func, insert, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from core.db import Request, ReviewDecision, ReviewItem, session_scope, utcnow
from core.db.leases import claim_next
from core.db.models import new_uuid_hex
from core.settings import ReviewSettings
from core.vocab import Decision, ReviewReason, ReviewStatus, Verdict
from gateway.errors import GatewayError, InvalidRequest
from gateway.review import outcomes
from gateway.review.outcomes import audit
from gateway.review.schemas import (
    AgreementRow,
    DecisionResult,
    QueuePublic,
    ReviewItemPublic,
    ReviewOutcome,
    decision_problem,
)

HELD, PENDING, CLAIMED = ReviewReason.HELD, ReviewStatus.PENDING, ReviewStatus.CLAIMED
DECIDED, EXPIRED = ReviewStatus.DECIDED, ReviewStatus.EXPIRED


class ReviewNotFound(GatewayError):
    status_code, type, code = 404, "not_found_error", "review_item_not_found"


class Conflict(GatewayError):
    """The item is not in a state that allows this (409); `code` says which state, the message the fix."""

    status_code, type = 409, "conflict_error"

    def __init__(self, message: str, code: str = "conflict"):
        super().__init__(message)
        self.code = code


class ReviewService:
    """The queue's operations (see the module docstring); what a verdict produces is `outcomes`'."""

    def __init__(
        self, sessions: sessionmaker[Session], settings: ReviewSettings, secret_key: SecretStr | str | None = None
    ) -> None:
        """`secret_key` (`Settings.secret_key`) signs the webhooks; without it they go unsigned."""
        self.sessions, self.settings = sessions, settings
        secret = secret_key.get_secret_value() if isinstance(secret_key, SecretStr) else secret_key
        self.webhooks = outcomes.Webhooks(settings.webhook_url, secret)

    # --- the gateway's side ---------------------------------------------------------------------

    def hold(
        self,
        request_row: dict[str, Any],
        reason: str = HELD,
        context: str | None = None,
        scores: dict[str, Any] | None = None,
        unsupported_spans: list[tuple[int, int]] | None = None,
    ) -> str:
        """Store the request (a `requests` row as the traffic log builds it, `id` included) and a pending
        review item for it, in one transaction; return the item's id.

        `context`, `scores` (detector name -> score, or a whole `guardrail_scores` document) and
        `unsupported_spans` are merged into the row's `guardrail_scores` (shape in the module docstring).

        The row is written here, so the caller must not also `record()` it in the traffic log. It is
        stored as given: the gateway's `Recorder.hold` builds it and applies the privacy settings first,
        exactly as for the traffic log.
        """
        if reason not in {r.value for r in ReviewReason}:
            raise ValueError(f"`reason` {reason!r} is not one of {', '.join(r.value for r in ReviewReason)}")
        now = utcnow()
        row = {"id": new_uuid_hex(), "created_at": now, **request_row}
        document = dict(row.get("guardrail_scores") or {})
        if scores is not None and isinstance(scores.get("scores"), dict):
            document.update(scores)  # a whole document of the shape above (the guardrails' `stored()`)
        elif scores is not None:
            document["scores"] = scores
        if context is not None:
            document["context"] = context
        if unsupported_spans is not None:
            document["unsupported_spans"] = [[int(start), int(end)] for start, end in unsupported_spans]
        row["guardrail_scores"] = document or None
        if reason == HELD and not row.get("decision"):
            row["decision"] = Decision.HOLD
        item_id = new_uuid_hex()
        with session_scope(self.sessions) as session:
            session.execute(insert(Request).values(**row))
            session.add(
                ReviewItem(
                    id=item_id,
                    request_id=row["id"],
                    reason=reason,
                    status=PENDING,
                    required_verdicts=self.settings.required_verdicts,
                    created_at=now,
                )
            )
            session.add(
                audit(
                    "gateway",
                    "review.hold",
                    item_id,
                    {"request_id": row["id"], "reason": reason, "risk": row.get("risk")},
                )
            )
        return item_id

    def outcome(self, item_id: str, api_key_id: int | None = None) -> ReviewOutcome:
        """The item's state for the client waiting on it; an overdue held item expires here first.
        With `api_key_id`, only the key that sent the request may read it (others get 404)."""
        with self.sessions() as session:
            item = session.get(ReviewItem, item_id)
            if item is None or (api_key_id is not None and item.request.api_key_id != api_key_id):
                raise ReviewNotFound(f"no review item `{item_id}` for this key")
            if not self._overdue(item, utcnow()):
                return outcomes.outcome(item, self.settings)
        self._expire([item_id])
        with self.sessions() as session:
            return outcomes.outcome(session.get_one(ReviewItem, item_id), self.settings)

    def expire_overdue(self) -> int:
        """Apply `review.hold_fallback` to every held item past `review.hold_timeout_s`; returns how many."""
        return len(self._expire(None))

    # --- the reviewer's side --------------------------------------------------------------------

    def claim(self, reviewer: str) -> ReviewItemPublic | None:
        """Lease the next item to `reviewer` (held before sampled, oldest first), or None if none is left."""
        self.expire_overdue()
        now = utcnow()
        lease_expires_at = now + timedelta(seconds=self.settings.lease_s)
        with session_scope(self.sessions) as session:
            if session.get_bind().dialect.name == "postgresql":  # one claim per reviewer at a time
                session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"claim:{reviewer}"})
            self._check_leases(session, reviewer, now, 0)
            item_id = claim_next(
                session,
                ReviewItem,
                self._claimable(now, reviewer),
                self._claim_order(),
                {"status": CLAIMED, "claimed_by": reviewer, "lease_expires_at": lease_expires_at},
            )
            if item_id is None:
                return None
            self._check_leases(session, reviewer, now, 1)  # SQLite: now that we write, no claim can race ours
            session.add(audit(reviewer, "review.claim", item_id, {"lease_expires_at": lease_expires_at}))
            item = session.get_one(ReviewItem, item_id, populate_existing=True)
            return self._public(item, self._verdict_counts(session, [item_id]))

    def decide(
        self, item_id: str, reviewer: str, verdict: str, corrected_answer: str | None = None, reason: str = ""
    ) -> DecisionResult:
        """Record `reviewer`'s verdict on the item they hold; decide the item once it has its k verdicts."""
        if verdict not in {v.value for v in Verdict}:
            raise InvalidRequest(f"`verdict` {verdict!r} is not one of approve, reject, edit", param="verdict")
        problem = decision_problem(verdict, corrected_answer, reason)
        if problem:
            raise InvalidRequest(problem[1], param=problem[0])
        now = utcnow()
        decided: ReviewOutcome | None = None
        with session_scope(self.sessions) as session:
            # Giving the lease back and the verdict are one step: the UPDATE only matches while this
            # reviewer's lease is live, so a reviewer whose lease ran out cannot overwrite the next one.
            mine = and_(
                ReviewItem.id == item_id,
                ReviewItem.status == CLAIMED,
                ReviewItem.claimed_by == reviewer,
                ReviewItem.lease_expires_at > now,
                self._not_overdue(now),
            )
            released = session.execute(
                update(ReviewItem)
                .where(mine)
                .values(status=PENDING, claimed_by=None, lease_expires_at=None)
                .execution_options(synchronize_session=False)
            )
            if released.rowcount != 1:
                refusal = self._why_not_yours(session, item_id, reviewer, now)
            else:
                refusal = None
                session.add(
                    ReviewDecision(
                        review_item_id=item_id,
                        reviewer=reviewer,
                        verdict=verdict,
                        corrected_answer=corrected_answer,
                        reason=reason.strip() or None,
                        created_at=now,
                    )
                )
                detail = {"verdict": verdict, "reason": reason.strip() or None, "corrected_answer": corrected_answer}
                session.add(audit(reviewer, "review.decision", item_id, detail))
                session.flush()
                item = session.get_one(ReviewItem, item_id, populate_existing=True)
                decisions = session.scalars(
                    select(ReviewDecision)
                    .where(ReviewDecision.review_item_id == item_id)
                    .order_by(ReviewDecision.created_at, ReviewDecision.id)
                ).all()
                if len(decisions) >= item.required_verdicts:
                    decided = outcomes.finalize(session, item, decisions, now, self.settings)
                result = DecisionResult(
                    id=item.id,
                    status=item.status,
                    verdicts=len(decisions),
                    required_verdicts=item.required_verdicts,
                    final_verdict=item.final_verdict,
                    final_answer=item.final_answer,
                )
        if refusal is not None:
            if refusal.code == "hold_expired":
                self._expire([item_id])
            raise refusal
        if decided is not None:
            self.webhooks.notify([decided])
        return result

    def queue(self, limit: int = 20) -> QueuePublic:
        """How many items wait and are held, and the next `limit` items in claim order (nothing is claimed)."""
        now = utcnow()
        lease_live = and_(ReviewItem.status == CLAIMED, ReviewItem.lease_expires_at > now)
        with self.sessions() as session:
            free = and_(self._free(now), self._not_overdue(now))
            pending = session.scalar(select(func.count()).select_from(ReviewItem).where(free)) or 0
            claimed = session.scalar(select(func.count()).select_from(ReviewItem).where(lease_live)) or 0
            items = session.scalars(select(ReviewItem).where(free).order_by(*self._claim_order()).limit(limit)).all()
            counts = self._verdict_counts(session, [i.id for i in items])
            return QueuePublic(pending=pending, claimed=claimed, items=[self._public(i, counts) for i in items])

    def agreement(self) -> list[AgreementRow]:
        """Cohen's kappa for every pair of reviewers over the items both judged."""
        with self.sessions() as session:
            rows = session.execute(
                select(ReviewDecision.review_item_id, ReviewDecision.reviewer, ReviewDecision.verdict)
            ).all()
        return outcomes.agreement(rows)

    def wait_for_webhooks(self, timeout_s: float = outcomes.WEBHOOK_TIMEOUT_S + 1) -> None:
        """Block until the webhook posts started so far have finished (tests, shutdown)."""
        self.webhooks.wait(timeout_s)

    # --- internals ------------------------------------------------------------------------------

    def _overdue(self, item: ReviewItem, now: datetime) -> bool:
        deadline = item.created_at + timedelta(seconds=self.settings.hold_timeout_s)
        return item.reason == HELD and item.status in (PENDING, CLAIMED) and deadline <= now

    def _not_overdue(self, now: datetime):
        cutoff = now - timedelta(seconds=self.settings.hold_timeout_s)
        return or_(ReviewItem.reason != HELD, ReviewItem.created_at > cutoff)

    def _check_leases(self, session: Session, reviewer: str, now: datetime, claiming: int) -> None:
        """Refuse (409, rolling the claim back) when `reviewer` holds more live leases than allowed
        (`claiming`: the one this transaction just took, counted among them)."""
        live = and_(
            ReviewItem.status == CLAIMED,
            ReviewItem.claimed_by == reviewer,
            ReviewItem.lease_expires_at > now,
            self._not_overdue(now),
        )
        held = (session.scalar(select(func.count()).select_from(ReviewItem).where(live)) or 0) - claiming
        limit = self.settings.max_leases_per_reviewer
        if held >= limit:
            raise Conflict(
                f"you already hold {held} review items (`review.max_leases_per_reviewer` = {limit}): "
                "decide one, or let its lease run out, before claiming",
                "too_many_leases",
            )

    @staticmethod
    def _free(now: datetime):
        return or_(ReviewItem.status == PENDING, and_(ReviewItem.status == CLAIMED, ReviewItem.lease_expires_at <= now))

    def _claimable(self, now: datetime, reviewer: str):
        judged = exists().where(ReviewDecision.review_item_id == ReviewItem.id, ReviewDecision.reviewer == reviewer)
        return and_(self._free(now), self._not_overdue(now), ~judged)

    @staticmethod
    def _claim_order():
        return (case((ReviewItem.reason == HELD, 0), else_=1), ReviewItem.created_at, ReviewItem.id)

    def _why_not_yours(self, session: Session, item_id: str, reviewer: str, now: datetime) -> GatewayError:
        item = session.get(ReviewItem, item_id)
        if item is None:
            return ReviewNotFound(f"no review item `{item_id}`")
        if item.status == DECIDED:
            return Conflict(f"review item `{item_id}` is already decided ({item.final_verdict})", "already_decided")
        if item.status == EXPIRED or self._overdue(item, now):
            return Conflict(
                f"review item `{item_id}` waited longer than `review.hold_timeout_s` "
                f"({self.settings.hold_timeout_s:g} s): its client already got the fallback; claim the next item",
                "hold_expired",
            )
        if item.status == CLAIMED and item.claimed_by != reviewer and item.lease_expires_at > now:
            return Conflict(
                f"lease lost: review item `{item_id}` is now held by another reviewer; claim the next item",
                "lease_lost",
            )
        if item.claimed_by == reviewer:
            return Conflict(
                f"lease lost: your lease on review item `{item_id}` ran out at {item.lease_expires_at.isoformat()} "
                f"(`review.lease_s` = {self.settings.lease_s:g} s); claim it again",
                "lease_expired",
            )
        judged = session.scalar(
            select(func.count())
            .select_from(ReviewDecision)
            .where(ReviewDecision.review_item_id == item_id, ReviewDecision.reviewer == reviewer)
        )
        if judged:
            return Conflict(f"you already gave review item `{item_id}` a verdict", "already_judged")
        return Conflict(
            f"review item `{item_id}` is not claimed by you: claim it first (`POST /v1/review/claim`)", "not_claimed"
        )

    def _expire(self, item_ids: list[str] | None) -> list[ReviewOutcome]:
        """Expire the overdue held items among `item_ids` (None: all); each expires exactly once."""
        now = utcnow()
        cutoff = now - timedelta(seconds=self.settings.hold_timeout_s)
        overdue = and_(
            ReviewItem.reason == HELD, ReviewItem.status.in_((PENDING, CLAIMED)), ReviewItem.created_at <= cutoff
        )
        expired = []
        with session_scope(self.sessions) as session:
            if item_ids is None:
                item_ids = list(session.scalars(select(ReviewItem.id).where(overdue).order_by(ReviewItem.created_at)))
            for item_id in item_ids:
                # Conditional: a concurrent sweep or decision that got there first leaves nothing to match.
                taken = session.execute(
                    update(ReviewItem)
                    .where(ReviewItem.id == item_id, overdue)
                    .values(status=EXPIRED, claimed_by=None, lease_expires_at=None, decided_at=now)
                    .execution_options(synchronize_session=False)
                )
                if taken.rowcount != 1:
                    continue
                item = session.get_one(ReviewItem, item_id, populate_existing=True)
                release = self.settings.hold_fallback == "release"
                item.final_answer = item.request.answer_text if release else None
                detail = {"hold_fallback": self.settings.hold_fallback, "hold_timeout_s": self.settings.hold_timeout_s}
                session.add(audit("review", "review.expired", item_id, detail))
                session.flush()
                expired.append(outcomes.outcome(item, self.settings))
        self.webhooks.notify(expired)
        return expired

    @staticmethod
    def _verdict_counts(session: Session, item_ids: list[str]) -> dict[str, int]:
        if not item_ids:
            return {}
        rows = session.execute(
            select(ReviewDecision.review_item_id, func.count())
            .where(ReviewDecision.review_item_id.in_(item_ids))
            .group_by(ReviewDecision.review_item_id)
        ).all()
        return dict(rows)

    def _public(self, item: ReviewItem, verdict_counts: dict[str, int]) -> ReviewItemPublic:
        request = item.request
        document = request.guardrail_scores or {}
        return ReviewItemPublic(
            id=item.id,
            status=item.status,
            reason=item.reason,
            route=request.route,
            question=outcomes.question(request),
            prompt=request.prompt_text,
            context=document.get("context"),
            answer=request.answer_text,
            unsupported_spans=[tuple(span) for span in document.get("unsupported_spans") or []],
            scores=document.get("scores") or {},
            risk=request.risk,
            created_at=item.created_at,
            claimed_by=item.claimed_by,
            lease_expires_at=item.lease_expires_at,
            hold_expires_at=outcomes.hold_expires_at(item, self.settings),
            required_verdicts=item.required_verdicts,
            verdicts=verdict_counts.get(item.id, 0),
        )
