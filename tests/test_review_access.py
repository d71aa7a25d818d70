"""Who may review, and how much: one reviewer name is one identity (keys cannot share it), a reviewer
holds at most `review.max_leases_per_reviewer` items, webhooks are signed with the secret key and
their URL never reaches a log line. On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from core.db import make_engine, session_factory, session_scope
from core.io import free_port
from core.keys import create_key, revoke
from core.settings import load_settings
from gateway.app import create_app
from gateway.review.outcomes import sign
from gateway.review.service import Conflict

from .test_review import hold, review_service


def test_two_live_keys_cannot_claim_the_same_reviewer_name(db_sessions):
    with session_scope(db_sessions) as session:
        create_key(session, "alice", "reviewer")
    for role in ("reviewer", "admin"):
        with session_scope(db_sessions) as session, pytest.raises(ValueError, match="already named 'alice'"):
            create_key(session, "alice", role)
    with session_scope(db_sessions) as session:
        create_key(session, "alice", "app")  # an app key reviews nothing: its name is no reviewer identity
        assert revoke(session, "alice") == 2
    with session_scope(db_sessions) as session:
        create_key(session, "alice", "reviewer")  # rotation: revoke, then create


def test_a_reviewer_holds_at_most_the_configured_number_of_leases(db_sessions):
    review = review_service(db_sessions, max_leases_per_reviewer=2)
    items = [hold(review, n) for n in range(4)]
    first, second = review.claim("alice"), review.claim("alice")
    with pytest.raises(Conflict) as err:
        review.claim("alice")
    assert err.value.status_code == 409 and err.value.code == "too_many_leases"
    assert review.claim("bob").id == items[2]  # the others still get work
    review.decide(first.id, "alice", "approve")
    assert review.claim("alice").id == items[3]  # a decision frees a lease
    assert second.id == items[1]


def test_the_claim_route_refuses_a_lease_beyond_the_limit_in_openai_shape(migrated_db_url, tmp_path):
    settings = load_settings(
        None,
        var_dir=tmp_path,
        vllm={"url": "http://127.0.0.1:9"},
        database={"url": migrated_db_url},
        gateway={"key_cache_s": 0},
        review={"max_leases_per_reviewer": 1},
    )
    sessions_ = session_factory(make_engine(migrated_db_url))
    with session_scope(sessions_) as session:
        key = create_key(session, "carol", "reviewer")[0]
    review = review_service(sessions_)
    hold(review, 0), hold(review, 1)
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as client:
        assert client.post("/v1/review/claim").status_code == 200
        refused = client.post("/v1/review/claim")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "too_many_leases" and refused.json()["error"]["type"] == "conflict_error"


class Receiver:
    """A webhook receiver that keeps the raw body and headers of each POST."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/s3cr3t-path"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhooks_are_signed_with_the_secret_key(db_sessions):
    receiver = Receiver()
    try:
        review = review_service(db_sessions, webhook_url=receiver.url)
        review = type(review)(db_sessions, review.settings, secret_key=SecretStr("k3y"))
        item_id = hold(review)
        review.claim("alice")
        review.decide(item_id, "alice", "approve")
        review.wait_for_webhooks()
    finally:
        receiver.close()
    [(headers, body)] = receiver.received
    timestamp = headers["X-TuneGate-Timestamp"]
    expected = "sha256=" + hmac.new(b"k3y", f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-TuneGate-Signature"], expected)  # what a receiver does
    assert sign("k3y", int(timestamp), body) == expected and sign("other", int(timestamp), body) != expected


def test_a_failed_webhook_is_logged_without_its_secret_path(db_sessions, caplog):
    url = f"http://127.0.0.1:{free_port()}/hooks/s3cr3t-path?token=abc"
    review = review_service(db_sessions, webhook_url=url)
    item_id = hold(review)
    review.claim("bob")
    with caplog.at_level(logging.WARNING, logger="tunegate.review"):
        review.decide(item_id, "bob", "approve")
        review.wait_for_webhooks()
    assert item_id in caplog.text and "127.0.0.1" in caplog.text
    assert "s3cr3t" not in caplog.text and "abc" not in caplog.text


def test_concurrent_claims_by_one_reviewer_respect_the_limit(db_sessions):
    review = review_service(db_sessions, max_leases_per_reviewer=2)
    for n in range(8):
        hold(review, n)
    start_together = threading.Barrier(6)
    claimed, refused, errors = [], [], []

    def work() -> None:
        start_together.wait()
        try:
            claimed.append(review.claim("alice").id)
        except Conflict as err:
            refused.append(err.code)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert len(claimed) == 2 and refused == ["too_many_leases"] * 4
    assert review.queue().claimed == 2
