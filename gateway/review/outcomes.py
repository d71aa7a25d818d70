"""What the review queue's verdicts produce: the final verdict of an item, the answer it releases, the
training example, the outcome the held client reads (and the webhook receives), the audit rows, and
the agreement between reviewers.

* The final verdict (`finalize`) is the majority of the item's k verdicts, a tie going to the more
  conservative one (reject > edit > approve); an edit's answer is that of the latest edit. Approved and
  corrected answers become training examples (dataset `reviewed`, kind train, source `review`), in the
  newest unfrozen version of that dataset (a new version when the newest is frozen).
* `outcome` is the item's state as the client waiting on it sees it (`ReviewOutcome`).
* `Webhooks` posts the outcomes of held items to `review.webhook_url` from a background thread (best
  effort: failures are logged, never raised; the URL only as scheme and host), signed with the secret
  key: `X-TuneGate-Timestamp` and `X-TuneGate-Signature: sha256=<hex>` (`sign`).
* `agreement` is Cohen's kappa for every pair of reviewers over the items both judged.

Used by `gateway.review.service` inside its transactions; nothing here commits.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from itertools import combinations
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import AuditLog, Dataset, Example, Request, ReviewDecision, ReviewItem
from core.io import last_user_text, sha256_text
from core.labels import REVIEWED_DATASET
from core.settings import ReviewSettings, mask_url
from core.vocab import DatasetKind, ExampleSource, ReviewReason, ReviewStatus, Verdict
from gateway.review.schemas import AgreementRow, ReviewOutcome

log = logging.getLogger("tunegate.review")

WEBHOOK_TIMEOUT_S = 3.0
CAUTION = {Verdict.APPROVE: 0, Verdict.EDIT: 1, Verdict.REJECT: 2}  # ties go to the more conservative verdict
FINAL = (ReviewStatus.DECIDED, ReviewStatus.EXPIRED)
MESSAGES = {
    Verdict.APPROVE: "approved by a reviewer: `answer` is the original answer",
    Verdict.EDIT: "corrected by a reviewer: `answer` is the corrected answer",
    Verdict.REJECT: "rejected by a reviewer: no answer is released",
}


def audit(actor: str, action: str, item_id: str, detail: dict[str, Any]) -> AuditLog:
    """An `audit_log` row about a review item (datetimes in `detail` as ISO strings)."""
    detail = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in detail.items()}
    return AuditLog(actor=actor, action=action, object_type="review_item", object_id=item_id, detail=detail)


def hold_expires_at(item: ReviewItem, settings: ReviewSettings) -> datetime | None:
    return item.created_at + timedelta(seconds=settings.hold_timeout_s) if item.reason == ReviewReason.HELD else None


def outcome(item: ReviewItem, settings: ReviewSettings) -> ReviewOutcome:
    """The item's state for the client waiting on it."""
    if item.status == ReviewStatus.DECIDED:
        message = MESSAGES[Verdict(item.final_verdict)]
    elif item.status == ReviewStatus.EXPIRED:
        waited = f"no reviewer decided within {settings.hold_timeout_s:g} s"
        released = (
            "the original answer is released unreviewed" if item.final_answer is not None else "no answer is released"
        )
        message = f"{waited}: {released}"
    else:
        message = "waiting for a reviewer; ask again later"
    return ReviewOutcome(
        id=item.id,
        request_id=item.request_id,
        reason=item.reason,
        status=item.status,
        done=item.status in FINAL,
        verdict=item.final_verdict,
        answer=item.final_answer if item.status in FINAL else None,
        message=message,
        created_at=item.created_at,
        decided_at=item.decided_at,
        hold_expires_at=hold_expires_at(item, settings),
    )


def finalize(
    session: Session, item: ReviewItem, decisions: list[ReviewDecision], now: datetime, settings: ReviewSettings
) -> ReviewOutcome | None:
    """Decide the item from its verdicts: majority verdict, the answer it delivers, the training example;
    returns the outcome to notify (held items only)."""
    counts = Counter(Verdict(d.verdict) for d in decisions)
    final = max(counts, key=lambda v: (counts[v], CAUTION[v]))
    if final == Verdict.EDIT:
        answer = [d.corrected_answer for d in decisions if d.verdict == Verdict.EDIT][-1]
    elif final == Verdict.APPROVE:
        answer = item.request.answer_text
    else:
        answer = None
    item.status, item.final_verdict, item.final_answer, item.decided_at = ReviewStatus.DECIDED, final, answer, now
    item.claimed_by = item.lease_expires_at = None
    detail = {"verdict": final.value, "verdicts": {d.reviewer: d.verdict for d in decisions}}
    session.add(audit("review", "review.decided", item.id, detail))
    if answer is not None:
        _add_example(session, item, answer)
    session.flush()
    return outcome(item, settings) if item.reason == ReviewReason.HELD else None


def _add_example(session: Session, item: ReviewItem, answer: str) -> None:
    messages = [*conversation(item.request), {"role": "assistant", "content": answer}]
    example = Example(
        dataset_id=_reviewed_dataset(session),
        messages=messages,
        source=ExampleSource.REVIEW,
        source_request_id=item.request_id,
        content_hash=sha256_text(json.dumps(messages, sort_keys=True, ensure_ascii=False)),
    )
    session.add(example)
    session.flush()
    detail = {"example_id": example.id, "dataset_id": example.dataset_id}
    session.add(audit("review", "example.create", item.id, detail))


def _reviewed_dataset(session: Session) -> int:
    """The newest unfrozen version of the `reviewed` dataset, created (next version) when there is none."""
    versions = session.execute(
        select(Dataset.id, Dataset.version, Dataset.frozen)
        .where(Dataset.name == REVIEWED_DATASET)
        .order_by(Dataset.version.desc())
    ).all()
    if versions and not versions[0].frozen:
        return versions[0].id
    version = versions[0].version + 1 if versions else 1
    try:
        with session.begin_nested():  # another process may create it at the same moment
            dataset = Dataset(name=REVIEWED_DATASET, version=version, kind=DatasetKind.TRAIN)
            session.add(dataset)
        return dataset.id
    except IntegrityError:
        return session.scalar(select(Dataset.id).where(Dataset.name == REVIEWED_DATASET, Dataset.version == version))


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def conversation(request: Request) -> list[dict[str, Any]]:
    """The request's chat messages (a completion prompt becomes one user message)."""
    body = request.request_json or {}
    if isinstance(body.get("messages"), list):
        return [{"role": m.get("role"), "content": _text(m.get("content"))} for m in body["messages"]]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": "user", "content": request.prompt_text or ""}]


def question(request: Request) -> str:
    """The question the reviewer sees: the last user message, else the completion prompt, else the log's text."""
    body = request.request_json or {}
    prompt = body.get("prompt")
    return last_user_text(body.get("messages"), prompt if isinstance(prompt, str) else request.prompt_text or "")


def agreement(rows: Iterable[tuple[str, str, str]]) -> list[AgreementRow]:
    """Cohen's kappa per reviewer pair from (item id, reviewer, verdict) rows."""
    from sklearn.metrics import cohen_kappa_score

    verdicts: dict[str, dict[str, str]] = defaultdict(dict)  # reviewer -> item -> verdict
    for item_id, reviewer, verdict in rows:
        verdicts[reviewer][item_id] = verdict
    labels = [v.value for v in Verdict]
    table = []
    for a, b in combinations(sorted(verdicts), 2):
        shared = sorted(verdicts[a].keys() & verdicts[b].keys())
        if not shared:
            continue
        ya, yb = [verdicts[a][i] for i in shared], [verdicts[b][i] for i in shared]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # undefined kappa (one label only) is reported as None
            kappa = float(cohen_kappa_score(ya, yb, labels=labels))
        table.append(
            AgreementRow(
                reviewer_a=a,
                reviewer_b=b,
                n=len(shared),
                observed_agreement=sum(x == y for x, y in zip(ya, yb, strict=True)) / len(shared),
                kappa=None if kappa != kappa else kappa,  # NaN -> None
            )
        )
    return table


class Webhooks:
    """Posts outcomes to `review.webhook_url` from background threads (best effort), signed with the
    secret key (see `sign`)."""

    def __init__(self, url: str | None, secret: str | None = None) -> None:
        self.url, self.secret = url, secret
        self._threads: list[threading.Thread] = []

    def notify(self, outcomes: list[ReviewOutcome]) -> None:
        if not self.url or not outcomes:
            return
        payloads = [o.model_dump(mode="json") for o in outcomes]
        args = (self.url, payloads, self.secret)
        thread = threading.Thread(target=_post_all, args=args, name="review-webhook", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def wait(self, timeout_s: float = WEBHOOK_TIMEOUT_S + 1) -> None:
        """Block until the posts started so far have finished (tests, shutdown)."""
        for thread in list(self._threads):
            thread.join(timeout_s)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """`X-TuneGate-Signature` of a webhook: `sha256=` + hex HMAC-SHA256, keyed with `secret_key`, of
    `"<timestamp>." + body` (the `X-TuneGate-Timestamp` header, a dot, the exact bytes POSTed).

    A receiver recomputes it over the raw body, compares with `hmac.compare_digest`, and refuses a
    timestamp more than a few minutes away from its clock (a replayed delivery)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def _post_all(url: str, payloads: list[dict[str, Any]], secret: str | None = None) -> None:
    shown = mask_url(url, hide_path=True)  # a webhook's path is often its credential: never logged
    for payload in payloads:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json"}
        if secret:
            timestamp = int(time.time())
            headers |= {"X-TuneGate-Timestamp": str(timestamp), "X-TuneGate-Signature": sign(secret, timestamp, body)}
        try:
            httpx.post(url, content=body, headers=headers, timeout=WEBHOOK_TIMEOUT_S).raise_for_status()
        except Exception as err:  # best effort: the outcome stays readable at GET /v1/reviews/{id}
            reason = mask_url(str(err), hide_path=True)
            log.warning(
                "review webhook %s for item %s failed: %s: %s", shown, payload.get("id"), type(err).__name__, reason
            )
