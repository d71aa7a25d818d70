"""evalsuite.gate on a migrated SQLite database: a candidate against the active version on the route's
test set and frozen holdout. `answer` here is a deterministic per-model lookup table that stands in for
vLLM (the real vLLM path is tested elsewhere), so every decision below is known in advance.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from core.db import (
    Adapter,
    AuditLog,
    Dataset,
    EvalMetric,
    EvalRun,
    Example,
    session_scope,
)
from core.io import last_user_text, normalise_answer
from core.labels import REVIEWED_DATASET
from core.loop_settings import GateSettings, LoopSettings
from core.vocab import AdapterStatus, DatasetKind, EvalKind, EvalStatus
from evalsuite import gate, stats, testsets

from .helpers import add_reviewed, question

ROUTE = "support"
HOLDOUT = 20
TEST = 30
# 26 items are needed for these settings, so TEST = 30 is enough evidence.
GATE = GateSettings(min_effect=0.3, expected_discordance=0.4)


@pytest.fixture
def factory(sqlite_db_sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    return sqlite_db_sessions


def gold(i: int) -> str:
    return f"{i % 89} cents per kWh."


def build(session: Session, holdout: int = HOLDOUT, test: int = TEST) -> tuple[list[str], list[str]]:
    """`holdout` holdout items, then `test` test items; returns their questions."""
    share = 0.25
    hold_q = [f"Holdout question number {k}?" for k in range(holdout)]
    for k, q in enumerate(hold_q):
        add_reviewed(session, q, gold(1000 + k))
    test_q, i = [], 0
    while len(test_q) < test:
        if testsets._test_side(question(i), share):
            test_q.append(question(i))
            add_reviewed(session, question(i), gold(i))
        i += 1
    a = testsets.assign_reviewed(session, ROUTE, LoopSettings(holdout_size=max(holdout, 1), test_share=share))
    assert (a.holdout, a.test) == (holdout, test)
    return hold_q, test_q


class Table:
    """(model, conversations) -> answers, from a per-model set of questions it answers right."""

    def __init__(self, session: Session, right: dict[str, set[str]]) -> None:
        self.gold = testsets.gold_answers(session, ROUTE)
        self.right = {m: {normalise_answer(q) for q in qs} for m, qs in right.items()}
        self.calls: list[tuple[str, int]] = []

    def __call__(self, model: str, conversations: Sequence[list[dict]]) -> list[str]:
        self.calls.append((model, len(conversations)))
        out = []
        for conversation in conversations:
            q = normalise_answer(last_user_text(conversation))
            out.append(self.gold[q].upper() + "  " if q in self.right[model] else "I do not know.")
        return out


def adapters(session: Session) -> tuple[Adapter, Adapter]:
    active = Adapter(name=ROUTE, version=1, base_model_hash="b", status=AdapterStatus.ACTIVE)
    cand = Adapter(name=ROUTE, version=2, base_model_hash="b", status=AdapterStatus.CANDIDATE)
    session.add_all([active, cand])
    session.flush()
    return cand, active


def run(session: Session, table: Table, settings: GateSettings = GATE) -> tuple[gate.GateRecord, Adapter]:
    cand, active = adapters(session)
    record = gate.run_gate(session, ROUTE, cand, "support-v2", active, "support-v1", table, settings)
    return record, cand


def audit_rows(session: Session, action: str) -> list[AuditLog]:
    return list(session.scalars(sa.select(AuditLog).where(AuditLog.action == action)))


@pytest.mark.parametrize("method", ["mcnemar", "bootstrap"])
def test_a_clearly_better_candidate_passes(factory, method: str) -> None:
    with session_scope(factory) as s:
        hold_q, test_q = build(s)
        table = Table(s, {"support-v2": set(hold_q + test_q), "support-v1": set(hold_q + test_q[:10])})
        record, cand = run(s, table, GATE.model_copy(update={"method": method}))
        assert record.decision is gate.GateDecision.PASSED and record.reasons == []
        assert cand.status == AdapterStatus.GATED
        assert record.candidate == "support/v2" and record.baseline == "support/v1"
        assert record.test_version == 1 and record.required_items == stats.required_pairs(0.05, 0.8, 0.3, 0.4)
        assert record.test["n"] == TEST and record.test["candidate_accuracy"] == 1.0
        assert record.test["baseline_accuracy"] == pytest.approx(10 / 30)
        assert record.test["candidate_only"] == 20 and record.test["baseline_only"] == 0
        assert record.test["p_value"] < 0.05 and record.test["method"] == method
        assert record.test["bootstrap"]["low"] > 0
        assert record.holdout["n"] == HOLDOUT and record.holdout["passed"] is True
        assert record.holdout["difference"] == 0.0
        # Each model answered each set once, every item in one call.
        assert sorted(table.calls) == sorted([("support-v2", TEST), ("support-v1", TEST),
                                              ("support-v2", HOLDOUT), ("support-v1", HOLDOUT)])  # fmt: skip
        run_id = record.eval_run_id
    with session_scope(factory) as s:
        eval_run = s.get(EvalRun, run_id)
        assert eval_run.kind == EvalKind.GATE and eval_run.status == EvalStatus.SUCCEEDED
        assert eval_run.adapter_id == cand.id and eval_run.finished_at is not None
        summary = eval_run.summary
        assert summary["decision"] == "passed" and summary["eval_run_id"] == run_id
        assert summary["test"]["n"] == TEST and summary["test"]["candidate_accuracy"] == 1.0
        assert summary["holdout"]["n"] == HOLDOUT and summary["holdout"]["passed"] is True
        assert summary["test_version"] == 1 and summary["route"] == ROUTE
        metrics = {m.name: m for m in s.scalars(sa.select(EvalMetric).where(EvalMetric.eval_run_id == run_id))}
        assert metrics["test_candidate_accuracy"].value == 1.0
        assert metrics["test_baseline_accuracy"].value == pytest.approx(10 / 30)
        assert metrics["test_p_value"].value < 0.05
        assert {"holdout_difference", "holdout_lower_bound"} <= set(metrics)
        assert all(m.n == TEST for m in metrics.values())
        (row,) = audit_rows(s, "adapter.gated")
        assert row.object_id == str(cand.id)
        assert row.detail["evidence"]["eval_run_id"] == run_id and row.detail["evidence"]["decision"] == "passed"
        assert s.get(Adapter, cand.id).status == AdapterStatus.GATED


def test_not_better_on_the_test_set_is_rejected(factory) -> None:
    with session_scope(factory) as s:
        hold_q, test_q = build(s)
        same = set(hold_q + test_q[:15])
        table = Table(s, {"support-v2": same, "support-v1": same})
        record, cand = run(s, table)
        assert record.decision is gate.GateDecision.REJECTED
        assert record.reasons == ["not better than the active version on the test set"]
        assert cand.status == AdapterStatus.REJECTED
        assert record.test["p_value"] == 1.0 and record.holdout["passed"] is True
        (row,) = audit_rows(s, "adapter.rejected")
        assert row.detail["evidence"]["eval_run_id"] == record.eval_run_id
        assert "not better" in row.detail["why"]


def test_slightly_better_is_not_enough(factory) -> None:
    with session_scope(factory) as s:
        hold_q, test_q = build(s)
        # One more item right out of 30: far from significant.
        table = Table(s, {"support-v2": set(hold_q + test_q[:16]), "support-v1": set(hold_q + test_q[:15])})
        record, cand = run(s, table)
        assert record.decision is gate.GateDecision.REJECTED and cand.status == AdapterStatus.REJECTED
        assert record.test["difference"] > 0 and record.test["p_value"] >= 0.05


def test_better_on_test_but_worse_on_the_holdout_is_rejected(factory) -> None:
    with session_scope(factory) as s:
        hold_q, test_q = build(s)
        table = Table(s, {"support-v2": set(hold_q[6:] + test_q), "support-v1": set(hold_q + test_q[:10])})
        record, cand = run(s, table)
        assert record.decision is gate.GateDecision.REJECTED and cand.status == AdapterStatus.REJECTED
        assert record.reasons == [f"worse on the holdout by more than the margin {GATE.holdout_margin}"]
        assert record.test["p_value"] < 0.05
        assert record.holdout["passed"] is False and record.holdout["difference"] == pytest.approx(-0.3)
        assert record.holdout["lower_bound"] < -GATE.holdout_margin
        assert record.holdout["candidate_accuracy"] == pytest.approx(0.7) and record.holdout["baseline_accuracy"] == 1.0
        (row,) = audit_rows(s, "adapter.rejected")
        assert "holdout" in row.detail["why"]


def test_too_few_test_items_waits_without_calling_vllm(factory) -> None:
    with session_scope(factory) as s:
        hold_q, test_q = build(s, test=10)
        table = Table(s, {"support-v2": set(hold_q + test_q), "support-v1": set()})
        record, cand = run(s, table)
        assert record.decision is gate.GateDecision.NOT_ENOUGH_EVIDENCE
        assert record.reasons == [f"the test set has 10 items; the power calculation asks for {record.required_items}"]
        assert record.required_items == 26 and record.test == {"n": 10} and record.holdout == {"n": HOLDOUT}
        assert table.calls == []
        cand_id, run_id = cand.id, record.eval_run_id
    with session_scope(factory) as s:
        assert s.get(Adapter, cand_id).status == AdapterStatus.CANDIDATE
        (row,) = audit_rows(s, "gate.waiting")
        assert row.object_type == "adapter" and row.object_id == str(cand_id)
        assert row.detail["eval_run_id"] == run_id and row.detail["decision"] == "not_enough_evidence"
        assert row.detail["version"] == "support/v2"
        assert audit_rows(s, "adapter.gated") == audit_rows(s, "adapter.rejected") == []
        assert s.get(EvalRun, run_id).summary["decision"] == "not_enough_evidence"
        assert s.scalars(sa.select(EvalMetric)).all() == []


def test_an_empty_holdout_waits(factory) -> None:
    with session_scope(factory) as s:
        # A test set without a holdout (written directly: the product always fills the holdout first).
        reviewed = Dataset(name=REVIEWED_DATASET, version=1, kind=DatasetKind.TRAIN)
        test = Dataset(name=f"test:{ROUTE}", version=1, kind=DatasetKind.TEST, frozen=True)
        s.add_all([reviewed, test])
        s.flush()
        for i in range(TEST):
            add_reviewed(s, question(i), gold(i))
        for e in s.scalars(sa.select(Example).where(Example.dataset_id == reviewed.id)).all():
            e.split = "test"
            copy = Example(dataset_id=test.id, messages=e.messages, source=e.source, split="test")
            copy.source_request_id, copy.content_hash = e.source_request_id, e.content_hash
            s.add(copy)
        s.flush()
        assert len(testsets.items(s, ROUTE, DatasetKind.TEST)) == TEST
        table = Table(s, {"support-v2": {question(i) for i in range(TEST)}, "support-v1": set()})
        record, cand = run(s, table)
        assert record.decision is gate.GateDecision.NOT_ENOUGH_EVIDENCE
        assert record.reasons == ["the holdout is empty"]
        assert table.calls == [] and cand.status == AdapterStatus.CANDIDATE
        assert len(audit_rows(s, "gate.waiting")) == 1


def test_the_base_model_as_baseline(factory) -> None:
    with session_scope(factory) as s:
        hold_q, test_q = build(s)
        cand = Adapter(name=ROUTE, version=1, base_model_hash="b", status=AdapterStatus.CANDIDATE)
        s.add(cand)
        s.flush()
        table = Table(s, {"support-v1": set(hold_q + test_q), "base": set(hold_q)})
        record = gate.run_gate(s, ROUTE, cand, "support-v1", None, "base", table, GATE)
        assert record.decision is gate.GateDecision.PASSED and record.baseline == "base"
        assert cand.status == AdapterStatus.GATED
