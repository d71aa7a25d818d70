"""Priority review: near-threshold, novel and drifted inputs are queued before low-risk familiar ones,
within a budget per route and UTC day, never twice, with an audit row per item."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from core.db import AuditLog, Request, ReviewItem, make_engine, migrate, session_factory
from core.loop_settings import LoopSettings
from evalsuite.prioritise import W_NEAR, W_NOVELTY, fill_review_queue, near_threshold_score, score_candidates

ROUTE = "support"
NOW = datetime(2025, 3, 4, 12, 0, tzinfo=UTC)
HOLD_AT = 0.6
TRAINING = [
    "What is the standing charge of tariff T417?",
    "How long is the contract term of tariff T417?",
    "Which regions is tariff T417 offered in?",
    "Can I switch from tariff T417 to T420 early?",
]


def fake_embed(texts: list[str]) -> np.ndarray:
    """Bag of words hashed into 256 buckets: the same words, the same vector."""
    out = np.zeros((len(texts), 256))
    for row, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            out[row, int(hashlib.sha256(word.encode()).hexdigest(), 16) % 256] += 1.0
    return out


@pytest.fixture
def sqlite_factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """SQLite only: the test with the real MiniLM embedder runs once, not once per backend."""
    url = f"sqlite:///{tmp_path}/t.db"
    migrate.upgrade(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def add(session: Session, name: str, question: str, risk: float = 0.05, decision: str = "allow", **kw) -> str:
    rid = hashlib.sha256(name.encode()).hexdigest()[:32]
    session.add(Request(id=rid, route=kw.pop("route", ROUTE), endpoint="chat", risk=risk, decision=decision,
                        created_at=kw.pop("created_at", NOW - timedelta(minutes=5)), answer_text="An answer.",
                        request_json={"messages": [{"role": "user", "content": question}]}, **kw))  # fmt: skip
    return rid


def queued(session: Session) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for request_id, reason in session.execute(sa.select(ReviewItem.request_id, ReviewItem.reason)):
        out.setdefault(request_id, []).append(reason)
    return out


def test_near_threshold_component() -> None:
    assert near_threshold_score(0.59, 0.6, 0.15) == pytest.approx(1 - 0.01 / 0.15)
    assert near_threshold_score(0.45, 0.6, 0.15) == pytest.approx(0.0)
    assert near_threshold_score(0.44, 0.6, 0.15) == 0.0
    assert near_threshold_score(0.6, 0.6, 0.15) == 0.0  # at the threshold it is held, not sampled
    assert near_threshold_score(None, 0.6, 0.15) == 0.0


def test_near_threshold_and_novel_inputs_are_chosen_over_low_risk_familiar_ones(db_sessions) -> None:
    settings = LoopSettings(review_budget_per_day=2, near_threshold=0.15)
    with db_sessions.begin() as s:
        near = add(s, "near", TRAINING[0], risk=0.55)
        novel = add(s, "novel", "Does the heat pump bonus cover solar batteries?")
        familiar = [add(s, f"familiar{i}", q, risk=0.1) for i, q in enumerate(TRAINING)]
        held = add(s, "held", "Does the heat pump bonus cover wind turbines?", risk=0.9, decision="hold")
        sampled = add(s, "sampled", "Why is the winter bonus paid twice in Northvale?", risk=0.58)
        s.flush()
        s.add(ReviewItem(request_id=sampled, reason="sampled", status="pending"))
        add(s, "old", "Why is the winter bonus paid twice in Southvale?", risk=0.58, created_at=NOW - timedelta(days=2))
        add(s, "billing", "Why is the winter bonus paid twice in Eastvale?", risk=0.58, route="billing")
    with db_sessions.begin() as s:
        result = fill_review_queue(s, ROUTE, settings, HOLD_AT, TRAINING, fake_embed, now=NOW)
    assert [c.request_id for c in result.chosen] == [near, novel]
    first, second = result.chosen
    assert first.near_threshold == pytest.approx(1 - 0.05 / 0.15, abs=1e-6) and first.novelty == pytest.approx(0)
    assert second.near_threshold == 0 and second.novelty > 0.7
    assert first.priority == pytest.approx(W_NEAR * first.near_threshold, abs=1e-6)
    assert second.priority == pytest.approx(W_NOVELTY * second.novelty, abs=1e-6)
    summary = result.to_dict()
    assert (summary["candidates"], summary["queued"], summary["budget_left"], summary["used_before"]) == (6, 2, 0, 0)
    with db_sessions() as s:
        items = queued(s)
        assert items[near] == ["priority"] and items[novel] == ["priority"] and items[sampled] == ["sampled"]
        assert not set(items) & {held, *familiar}
        audits = s.scalars(sa.select(AuditLog).where(AuditLog.action == "review.prioritised")).all()
        assert {(a.actor, a.object_type) for a in audits} == {("loop", "review_item")}
        assert {a.object_id for a in audits} == {c.item_id for c in result.chosen}
        detail = next(a.detail for a in audits if a.detail["request_id"] == near)
        assert detail["near_threshold"] == first.near_threshold and detail["novelty"] == first.novelty
        assert "drift" in detail and detail["weights"]["near_threshold"] == W_NEAR
        item = s.get(ReviewItem, first.item_id)
        assert (item.status, item.required_verdicts, item.reason) == ("pending", 1, "priority")


def test_the_budget_holds_across_calls_of_a_day_and_nothing_is_queued_twice(db_sessions) -> None:
    settings = LoopSettings(review_budget_per_day=3)
    with db_sessions.begin() as s:
        for i in range(2):
            add(s, f"a{i}", f"Is the solar feed in rate {i} paid monthly?", risk=0.5)
        for i in range(4):
            add(s, f"familiar{i}", TRAINING[i])
    with db_sessions.begin() as s:
        first = fill_review_queue(s, ROUTE, settings, HOLD_AT, TRAINING, fake_embed, now=NOW)
    with db_sessions.begin() as s:  # nothing new worth a look: the familiar ones stay out, the queued ones too
        idle = fill_review_queue(s, ROUTE, settings, HOLD_AT, TRAINING, fake_embed, now=NOW + timedelta(minutes=1))
        for i in range(3):
            add(s, f"b{i}", f"Is the battery storage grant {i} taxable?", risk=0.52,
                created_at=NOW + timedelta(minutes=2))  # fmt: skip
    with db_sessions.begin() as s:
        second = fill_review_queue(s, ROUTE, settings, HOLD_AT, TRAINING, fake_embed, now=NOW + timedelta(minutes=3))
    with db_sessions.begin() as s:
        spent = fill_review_queue(s, ROUTE, settings, HOLD_AT, TRAINING, fake_embed, now=NOW + timedelta(minutes=4))
    with db_sessions.begin() as s:
        tomorrow = fill_review_queue(s, ROUTE, settings, HOLD_AT, TRAINING, fake_embed, now=NOW + timedelta(hours=13))
    assert (len(first.chosen), first.budget_left) == (2, 1)
    assert (len(idle.chosen), idle.candidates) == (0, 4)
    assert (len(second.chosen), second.used_before, second.budget_left) == (1, 2, 0)
    assert (len(spent.chosen), spent.candidates, spent.used_before) == (0, 0, 3)
    assert tomorrow.used_before == 0 and len(tomorrow.chosen) == 2  # the last two grant questions
    with db_sessions() as s:
        items = queued(s)
    assert all(len(reasons) == 1 for reasons in items.values()) and len(items) == 5


def test_questions_near_a_drift_cluster_come_first(db_sessions) -> None:
    settings = LoopSettings(review_budget_per_day=1)
    drift = ["Is the heat pump bonus paid for hybrid heat pumps?"]
    with db_sessions.begin() as s:
        add(s, "other", "Does the cooling tower levy apply to offices?")
        drifted = add(s, "drifted", "Is the heat pump bonus paid for air heat pumps?")
    with db_sessions.begin() as s:
        result = fill_review_queue(s, ROUTE, settings, HOLD_AT, TRAINING, fake_embed, drift_texts=drift, now=NOW)
    [choice] = result.chosen
    assert choice.request_id == drifted and choice.drift > 0.5


def test_with_the_real_minilm_embedder_off_topic_questions_are_novel(sqlite_factory) -> None:
    from evalsuite.drift import minilm_embedder

    embed, factory = minilm_embedder(), sqlite_factory
    settings = LoopSettings(review_budget_per_day=1)
    with factory.begin() as s:
        paraphrase = add(s, "paraphrase", "What's the monthly standing charge on the T417 tariff?")
        off_topic = add(s, "off", "How long should sourdough bread proof before baking?")
    with factory.begin() as s:
        result = fill_review_queue(s, ROUTE, settings, HOLD_AT, TRAINING, embed, now=NOW)
    [choice] = result.chosen
    assert choice.request_id == off_topic
    with factory() as s:
        requests = [s.get(Request, paraphrase), s.get(Request, off_topic)]
        near, far = score_candidates(requests, settings, HOLD_AT, TRAINING, embed)
    assert near.novelty < 0.4 < far.novelty
