"""The review queue on SQLite and PostgreSQL: hold -> claim -> decide, leases (exclusive, expiring,
required for a decision), overlap with agreement, the hold timeout's two fallbacks, corrections as
training examples, the audit log, the webhook, and the API's roles and shapes.

PostgreSQL is the server on 127.0.0.1:5432 (`TUNEGATE_TEST_POSTGRES_URL` names another); this module
creates its own database there and drops it at the end.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from core.db import (
    AuditLog,
    Dataset,
    Example,
    Request,
    ReviewDecision,
    ReviewItem,
    make_engine,
    session_factory,
    session_scope,
    utcnow,
)
from core.io import free_port
from core.keys import create_key
from core.settings import ReviewSettings, load_settings
from gateway.errors import InvalidRequest
from gateway.review.service import Conflict, ReviewNotFound, ReviewService

ANSWER = "T896 is available in Leeds and York."
QUESTION = "Where is T896 available?"
CONTEXT = "Tariff T896 is available in Leeds only."


# --- databases ----------------------------------------------------------------------------------


def review_service(sessions, **settings) -> ReviewService:
    return ReviewService(sessions, ReviewSettings(**settings))


def request_row(n: int = 0, answer: str = ANSWER, question: str = QUESTION, api_key_id: int | None = None) -> dict:
    """A `requests` row as the gateway's traffic log builds it."""
    messages = [{"role": "system", "content": "You answer tariff questions."}, {"role": "user", "content": question}]
    return {
        "id": uuid.uuid4().hex,
        "created_at": utcnow(),
        "api_key_id": api_key_id,
        "route": "support",
        "endpoint": "chat",
        "stream": False,
        "status_code": 202,
        "request_json": {"model": "support", "messages": messages},
        "response_json": None,
        "prompt_text": "\n".join(f"{m['role']}: {m['content']}" for m in messages),
        "answer_text": answer,
        "risk": 0.81,
        "decision": "hold",
        "error": None,
        "guardrail_scores": None,
    }


def hold(service: ReviewService, n: int = 0, reason: str = "held", **row) -> str:
    return service.hold(
        request_row(n, **row),
        reason=reason,
        context=CONTEXT,
        scores={"grounding": 0.2, "uncertainty": 0.7},
        unsupported_spans=[(27, 36)],
    )


def audit_actions(sessions) -> Counter:
    with sessions() as session:
        return Counter(session.scalars(select(AuditLog.action)))


class Webhook:
    """A tiny HTTP server that records the JSON POSTed to it."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Webhook:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the service --------------------------------------------------------------------------------


def test_hold_claim_decide_with_each_verdict(db_sessions):
    review = review_service(db_sessions)
    sampled = hold(review, reason="sampled")  # older, but held items go first: their clients wait
    approved, rejected, edited = hold(review), hold(review), hold(review)

    item = review.claim("alice")
    assert item.id == approved and item.status == "claimed" and item.claimed_by == "alice"
    assert item.question == QUESTION and item.context == CONTEXT and item.answer == ANSWER
    assert item.unsupported_spans == [(27, 36)] and ANSWER[27:36] == "and York."
    assert item.scores == {"grounding": 0.2, "uncertainty": 0.7} and item.risk == pytest.approx(0.81)
    assert item.lease_expires_at > utcnow() and item.hold_expires_at > utcnow()
    assert item.required_verdicts == 1 and item.verdicts == 0
    waiting = review.outcome(approved)
    assert (waiting.status, waiting.done, waiting.answer) == ("claimed", False, None)

    result = review.decide(approved, "alice", "approve", reason="matches the tariff sheet")
    assert (result.status, result.final_verdict, result.final_answer) == ("decided", "approve", ANSWER)
    outcome = review.outcome(approved)
    assert (outcome.status, outcome.done, outcome.verdict, outcome.answer) == ("decided", True, "approve", ANSWER)

    assert review.claim("alice").id == rejected
    review.decide(rejected, "alice", "reject", reason="York is not in the context")
    outcome = review.outcome(rejected)
    assert (outcome.verdict, outcome.answer) == ("reject", None) and "no answer" in outcome.message

    assert review.claim("bob").id == edited
    fixed = "T896 is available in Leeds only."
    review.decide(edited, "bob", "edit", corrected_answer=fixed, reason="York is wrong")
    outcome = review.outcome(edited)
    assert (outcome.verdict, outcome.answer) == ("edit", fixed) and "corrected" in outcome.message

    assert review.claim("bob").id == sampled
    review.decide(sampled, "bob", "approve")
    assert review.claim("bob") is None

    with db_sessions() as session:
        decisions = {d.review_item_id: d for d in session.scalars(select(ReviewDecision))}
        assert (decisions[edited].reviewer, decisions[edited].reason) == ("bob", "York is wrong")
        assert decisions[edited].corrected_answer == fixed and decisions[edited].created_at <= utcnow()
        assert decisions[sampled].reason is None
        item_row = session.get(ReviewItem, edited)
        assert item_row.decided_at is not None and item_row.claimed_by is None

        # Approvals and corrections become labelled training examples; rejections do not.
        dataset = session.scalar(select(Dataset).where(Dataset.name == "reviewed"))
        assert (dataset.kind, dataset.version) == ("train", 1)
        examples = {e.source_request_id: e for e in session.scalars(select(Example))}
        requests = {i.request_id: i.id for i in session.scalars(select(ReviewItem))}
        assert sorted(requests[r] for r in examples) == sorted([approved, edited, sampled])
        corrected = next(e for e in examples.values() if requests[e.source_request_id] == edited)
        assert corrected.source == "review" and corrected.dataset_id == dataset.id
        assert corrected.messages == [
            {"role": "system", "content": "You answer tariff questions."},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": fixed},
        ]
        assert len(corrected.content_hash) == 64

    assert audit_actions(db_sessions) == {
        "review.hold": 4,
        "review.claim": 4,
        "review.decision": 4,
        "review.decided": 4,
        "example.create": 3,
    }
    with db_sessions() as session:
        entry = session.scalar(
            select(AuditLog).where(AuditLog.action == "review.decision", AuditLog.object_id == edited)
        )
        assert entry.actor == "bob" and entry.detail["verdict"] == "edit" and entry.detail["reason"] == "York is wrong"


def test_hold_stores_the_request_and_the_guardrail_document(db_sessions):
    review = review_service(db_sessions)
    row = request_row()
    document = {"scores": {"grounding": 0.1}, "context": CONTEXT, "unsupported_spans": [[0, 4]], "evidence": {}}
    item_id = review.hold(row, reason="held", scores=document)  # a whole document, as the guardrails store it
    with db_sessions() as session:
        stored = session.get(Request, row["id"])
        assert stored.answer_text == ANSWER and stored.decision == "hold"
        assert stored.guardrail_scores == document
        assert session.get(ReviewItem, item_id).request_id == row["id"]
    with pytest.raises(ValueError, match="`reason`"):
        review.hold(request_row(), reason="bored")


def test_a_decision_needs_the_live_lease_and_a_valid_body(db_sessions):
    review = review_service(db_sessions)
    first, second = hold(review), hold(review)
    with pytest.raises(Conflict) as err:
        review.decide(first, "alice", "approve")
    assert err.value.status_code == 409 and err.value.code == "not_claimed" and "claim it first" in err.value.message

    assert review.claim("alice").id == first
    with pytest.raises(Conflict) as err:
        review.decide(first, "bob", "approve")  # bob does not hold it
    assert err.value.code == "lease_lost"
    with pytest.raises(InvalidRequest, match="`corrected_answer` is required") as bad:
        review.decide(first, "alice", "edit", reason="wrong")
    assert bad.value.param == "corrected_answer"
    with pytest.raises(InvalidRequest, match="`reason` is required"):
        review.decide(first, "alice", "reject")
    with pytest.raises(InvalidRequest, match="`verdict`"):
        review.decide(first, "alice", "maybe")
    with pytest.raises(ReviewNotFound):
        review.decide("0" * 32, "alice", "approve")

    review.decide(first, "alice", "approve")
    with pytest.raises(Conflict) as err:
        review.decide(first, "alice", "approve")
    assert err.value.code == "already_decided"
    with pytest.raises(ReviewNotFound):
        review.outcome("0" * 32)
    assert review.outcome(second).status == "pending"


def test_an_expired_lease_goes_to_the_next_reviewer(db_sessions):
    review = review_service(db_sessions, lease_s=1.0)
    item_id = hold(review)
    assert review.claim("alice").id == item_id
    assert review.claim("bob") is None  # alice's lease is live
    time.sleep(1.1)
    reclaimed = review.claim("bob")
    assert reclaimed.id == item_id and reclaimed.claimed_by == "bob"
    with pytest.raises(Conflict) as err:
        review.decide(item_id, "alice", "approve")  # too late: the item is bob's now
    assert err.value.code == "lease_lost" and "another reviewer" in err.value.message
    time.sleep(1.1)
    with pytest.raises(Conflict) as err:
        review.decide(item_id, "bob", "approve")  # nobody took it, but bob's own lease ran out
    assert err.value.code == "lease_expired" and "claim it again" in err.value.message
    assert review.claim("bob").id == item_id
    assert review.decide(item_id, "bob", "approve").status == "decided"
    assert audit_actions(db_sessions)["review.claim"] == 3


def test_concurrent_claims_never_hand_one_item_to_two_reviewers(db_sessions):
    review = review_service(db_sessions, max_leases_per_reviewer=24)
    items = {hold(review, n) for n in range(24)}
    reviewers = [f"reviewer-{i}" for i in range(6)]
    claims: dict[str, list[str]] = {r: [] for r in reviewers}
    start_together = threading.Barrier(len(reviewers))
    errors: list[BaseException] = []

    def work(reviewer: str) -> None:
        try:
            start_together.wait()
            while (item := review.claim(reviewer)) is not None:
                claims[reviewer].append(item.id)
        except BaseException as err:  # reported by the main thread below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(r,)) for r in reviewers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    everything = [i for ids in claims.values() for i in ids]
    assert len(everything) == len(set(everything)) == 24 and set(everything) == items
    with db_sessions() as session:
        holders = dict(session.execute(select(ReviewItem.id, ReviewItem.claimed_by)).all())
    assert all(holders[i] == r for r, ids in claims.items() for i in ids)


def test_overlap_needs_k_verdicts_and_agreement_is_reported(db_sessions):
    review = review_service(db_sessions, required_verdicts=2)
    items = [hold(review, n) for n in range(6)]
    alice = ["approve", "approve", "reject", "edit", "approve", "edit"]
    bob = ["approve", "reject", "reject", "edit", "approve", "approve"]

    def judge(reviewer: str, verdicts: list[str]) -> None:
        for expected_id, verdict in zip(items, verdicts, strict=True):
            item = review.claim(reviewer)
            assert item.id == expected_id
            corrected = f"{reviewer}'s answer {expected_id[:4]}" if verdict == "edit" else None
            reason = "" if verdict == "approve" else f"{reviewer} disagrees"
            review.decide(item.id, reviewer, verdict, corrected, reason)
        assert review.claim(reviewer) is None  # never the same item twice

    judge("alice", alice)
    queue = review.queue()
    assert queue.pending == 6 and [i.verdicts for i in queue.items] == [1] * 6
    assert {review.outcome(i).status for i in items} == {"pending"}
    judge("bob", bob)

    finals = [review.outcome(i) for i in items]
    assert [o.verdict for o in finals] == ["approve", "reject", "reject", "edit", "approve", "edit"]
    assert finals[1].answer is None  # approve vs reject: the conservative verdict wins the tie
    assert finals[3].answer == f"bob's answer {items[3][:4]}"  # both edited: the latest edit
    assert finals[5].answer == f"alice's answer {items[5][:4]}"  # edit vs approve: edit
    assert finals[0].answer == ANSWER

    [row] = review.agreement()
    assert (row.reviewer_a, row.reviewer_b, row.n) == ("alice", "bob", 6)
    assert row.observed_agreement == pytest.approx(4 / 6)
    # p_o = 4/6; p_e = (3*3 + 1*2 + 2*1) / 36 = 13/36; kappa = (24 - 13) / (36 - 13)
    assert row.kappa == pytest.approx(11 / 23)


def test_agreement_is_none_when_kappa_is_undefined(db_sessions):
    review = review_service(db_sessions, required_verdicts=2)
    item_id = hold(review)
    for reviewer in ("alice", "bob"):
        review.claim(reviewer)
        review.decide(item_id, reviewer, "approve")
    [row] = review.agreement()
    assert (row.n, row.observed_agreement, row.kappa) == (1, 1.0, None)


@pytest.mark.parametrize("fallback", ["refuse", "release"])
def test_a_held_answer_nobody_decides_in_time_follows_the_fallback(db_sessions, fallback):
    with Webhook() as hook:
        review = review_service(db_sessions, hold_timeout_s=1.5, hold_fallback=fallback, webhook_url=hook.url)
        claimed, untouched, swept = hold(review), hold(review), hold(review)
        sampled = hold(review, reason="sampled")
        assert review.claim("alice").id == claimed
        time.sleep(1.6)

        outcome = review.outcome(untouched)  # applied lazily, when the client asks
        assert (outcome.status, outcome.done, outcome.verdict) == ("expired", True, None)
        assert outcome.answer == (ANSWER if fallback == "release" else None)
        assert ("released unreviewed" if fallback == "release" else "no answer is released") in outcome.message
        assert review.outcome(untouched) == outcome  # stable on every later read

        with pytest.raises(Conflict) as err:
            review.decide(claimed, "alice", "approve")  # the client already got the fallback
        assert err.value.code == "hold_expired" and "hold_timeout_s" in err.value.message
        assert review.outcome(claimed).status == "expired"

        assert review.expire_overdue() == 1  # `swept`; the others expired already, sampled items never do
        assert review.expire_overdue() == 0
        assert review.outcome(swept).status == "expired"
        assert review.outcome(sampled).status == "pending"
        assert review.claim("bob").id == sampled  # expired items are not handed out
        review.wait_for_webhooks()

    assert sorted(p["id"] for p in hook.received) == sorted([claimed, untouched, swept])
    assert {(p["status"], p["answer"]) for p in hook.received} == {
        ("expired", ANSWER if fallback == "release" else None)
    }
    assert audit_actions(db_sessions)["review.expired"] == 3


def test_the_webhook_gets_decided_outcomes_and_a_dead_one_is_only_logged(db_sessions, caplog):
    with Webhook() as hook:
        review = review_service(db_sessions, webhook_url=hook.url)
        held, sampled = hold(review), hold(review, reason="sampled")
        review.claim("alice")
        review.decide(held, "alice", "edit", corrected_answer="Leeds only.", reason="York is wrong")
        review.claim("alice")
        review.decide(sampled, "alice", "approve")  # nobody waits on a sampled item: no webhook
        review.wait_for_webhooks()
    [payload] = hook.received
    assert payload["object"] == "review.outcome" and payload["id"] == held
    assert (payload["status"], payload["verdict"], payload["answer"], payload["done"]) == (
        "decided",
        "edit",
        "Leeds only.",
        True,
    )

    dead = review_service(db_sessions, webhook_url=f"http://127.0.0.1:{free_port()}/hook")
    item_id = hold(dead)
    dead.claim("bob")
    with caplog.at_level(logging.WARNING, logger="tunegate.review"):
        assert dead.decide(item_id, "bob", "approve").status == "decided"  # the decision stands
        dead.wait_for_webhooks()
    assert "webhook" in caplog.text and item_id in caplog.text


def test_the_queue_counts_and_lists_without_claiming(db_sessions):
    review = review_service(db_sessions)
    ids = [hold(review, n) for n in range(3)]
    review.claim("alice")
    queue = review.queue(limit=5)
    assert (queue.pending, queue.claimed) == (2, 1)
    assert [i.id for i in queue.items] == ids[1:] and {i.status for i in queue.items} == {"pending"}
    assert review.queue().pending == 2  # nothing was claimed by looking


# --- the API ------------------------------------------------------------------------------------


def test_review_api_roles_and_round_trip(migrated_db_url, tmp_path):
    from fastapi.testclient import TestClient

    from gateway.app import create_app

    settings = load_settings(
        None,
        var_dir=tmp_path,
        vllm={"url": "http://127.0.0.1:9"},
        database={"url": migrated_db_url},
        gateway={"key_cache_s": 0},
    )
    sessions = session_factory(make_engine(migrated_db_url))
    with session_scope(sessions) as session:
        app_key, app_row = create_key(session, "shop", "app")
        other_app_key = create_key(session, "other-shop", "app")[0]
        alice_key = create_key(session, "alice", "reviewer")[0]
        bob_key = create_key(session, "bob", "reviewer")[0]
        admin_key = create_key(session, "ops", "admin")[0]
        app_key_id = app_row.id
    review = ReviewService(sessions, settings.review)
    item_id = hold(review, api_key_id=app_key_id)

    def auth(key: str) -> dict:
        return {"Authorization": f"Bearer {key}"}

    with TestClient(create_app(settings)) as client:
        page = client.get("/review")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "Claim next" in page.text and "frame-ancestors 'none'" in page.headers["content-security-policy"]

        assert client.post("/v1/review/claim").status_code == 401
        decision = {"verdict": "approve", "reason": ""}
        for method, path, body in [
            ("POST", "/v1/review/claim", None),
            ("GET", "/v1/review/queue", None),
            ("GET", "/v1/review/agreement", None),
            ("POST", f"/v1/review/items/{item_id}/decision", decision),
        ]:
            denied = client.request(method, path, json=body, headers=auth(app_key))
            assert denied.status_code == 403, path
            assert (
                denied.json()["error"]["code"] == "insufficient_role"
                and "reviewer" in denied.json()["error"]["message"]
            )
        assert client.get(f"/v1/reviews/{item_id}", headers=auth(alice_key)).status_code == 403

        assert client.get("/v1/review/queue", headers=auth(alice_key)).json()["pending"] == 1
        claimed = client.post("/v1/review/claim", headers=auth(alice_key))
        assert claimed.status_code == 200
        item = claimed.json()
        assert item["id"] == item_id and item["claimed_by"] == "alice" and item["unsupported_spans"] == [[27, 36]]

        waiting = client.get(f"/v1/reviews/{item_id}", headers=auth(app_key))
        assert waiting.status_code == 202 and waiting.headers["retry-after"] == "5"
        assert (waiting.json()["status"], waiting.json()["answer"]) == ("claimed", None)

        url = f"/v1/review/items/{item_id}/decision"
        conflict = client.post(url, json=decision, headers=auth(bob_key))
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "lease_lost"
        extra = client.post(url, json={**decision, "score": 5}, headers=auth(alice_key))
        assert extra.status_code == 400 and extra.json()["error"]["param"] == "score"
        no_answer = client.post(url, json={"verdict": "edit", "reason": "wrong"}, headers=auth(alice_key))
        assert no_answer.status_code == 400 and "`corrected_answer` is required" in no_answer.json()["error"]["message"]
        edit = {"verdict": "edit", "corrected_answer": "Leeds only.", "reason": "York is not in the context"}
        done = client.post(url, json=edit, headers=auth(alice_key))
        assert done.status_code == 200
        assert (done.json()["status"], done.json()["final_verdict"], done.json()["final_answer"]) == (
            "decided",
            "edit",
            "Leeds only.",
        )

        final = client.get(f"/v1/reviews/{item_id}", headers=auth(app_key))
        assert final.status_code == 200
        assert {k: final.json()[k] for k in ("id", "status", "verdict", "answer", "done")} == {
            "id": item_id,
            "status": "decided",
            "verdict": "edit",
            "answer": "Leeds only.",
            "done": True,
        }
        assert client.get(f"/v1/reviews/{item_id}", headers=auth(other_app_key)).status_code == 404  # not its request
        assert client.get(f"/v1/reviews/{item_id}", headers=auth(admin_key)).status_code == 200
        missing = client.get(f"/v1/reviews/{'0' * 32}", headers=auth(app_key))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "review_item_not_found"

        assert client.post("/v1/review/claim", headers=auth(alice_key)).status_code == 204
        assert client.get("/v1/review/queue", headers=auth(admin_key)).json() == {
            "pending": 0,
            "claimed": 0,
            "items": [],
        }
        assert client.get("/v1/review/agreement", headers=auth(bob_key)).json() == []
