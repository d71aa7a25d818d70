"""The loop report (`evalsuite.report.write_report`) on a migrated SQLite database: every section from
synthetic rows of each kind, "no data yet" sections for an empty database, and escaped question text."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import matplotlib.image
import pytest
import sqlalchemy as sa

from core.db import (
    Adapter,
    Alias,
    AliasTarget,
    AuditLog,
    EvalRun,
    Job,
    OnlineScore,
    Request,
    ReviewItem,
    Rollout,
    make_engine,
    session_factory,
    upgrade,
)
from core.lifecycle import set_weights, transition
from core.vocab import AdapterStatus as S
from evalsuite.report import write_report

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
HOSTILE = "<script>alert('x')</script> why is my bill so high?"


@pytest.fixture
def session(tmp_path):
    url = f"sqlite:///{tmp_path}/t.db"
    upgrade(url)
    engine = make_engine(url)
    with session_factory(engine)() as s:
        yield s
    engine.dispose()


def _adapter(session, version: int) -> Adapter:
    a = Adapter(name="support", version=version, base_model_hash="b" * 16, created_at=T0 + timedelta(hours=version))
    session.add(a)
    session.flush()
    return a


def _drift_run(at: datetime, auroc: float, drifted: bool, typical: list[dict]) -> EvalRun:
    summary = {
        "route": "support", "window_end": (at + timedelta(hours=1)).isoformat(),
        "drift": {
            "risk": {"method": "ks", "statistic": 0.1 + auroc / 10, "p_value": 0.2, "psi": 0.05, "drifted": drifted},
            "flag_rate": {"method": "fisher", "statistic": 0.0, "p_value": 0.5, "drifted": False},
            "embedding": {"auroc": auroc, "threshold": 0.75, "drifted": drifted, "typical_drifted": typical},
        },
    }  # fmt: skip
    return EvalRun(kind="online", status="succeeded", started_at=at, finished_at=at, summary=summary)


def _fill(session) -> None:
    session.add(Alias(name="support", targets=[AliasTarget(adapter_id=None, weight=1.0)]))
    v2, v3 = _adapter(session, 2), _adapter(session, 3)
    session.add_all([
        Job(kind="train", status="succeeded", created_at=T0, finished_at=T0 + timedelta(minutes=30),
            result={"name": "support", "version": 2, "adapter_id": v2.id}),
        Job(kind="train", status="succeeded", created_at=T0 + timedelta(hours=2),
            finished_at=T0 + timedelta(hours=2, minutes=30),
            result={"name": "support", "version": 3, "adapter_id": v3.id}),
    ])  # fmt: skip
    gate_v2 = {"decision": "passed", "candidate": "support/v2", "baseline": "base", "required_items": 120,
               "test": {"n": 150, "candidate_accuracy": 0.8133, "baseline_accuracy": 0.6467, "difference": 0.1667,
                        "p_value": 0.000123, "candidate_only": 30, "baseline_only": 5},
               "holdout": {"difference": 0.021, "lower_bound": -0.0123, "margin": 0.02, "passed": True}}
    gate_v3 = {"decision": "rejected", "candidate": "support/v3", "baseline": "support/v2", "required_items": 120,
               "test": {"n": 130, "candidate_accuracy": 0.7769, "baseline_accuracy": 0.8077, "difference": -0.03,
                        "p_value": 0.8765, "candidate_only": 4, "baseline_only": 8},
               "holdout": {"difference": -0.061, "lower_bound": -0.0987, "margin": 0.02, "passed": False}}  # fmt: skip
    session.add_all([
        EvalRun(kind="gate", adapter_id=v2.id, status="succeeded", started_at=T0 + timedelta(hours=1),
                finished_at=T0 + timedelta(hours=1, minutes=5), summary=gate_v2),
        EvalRun(kind="gate", adapter_id=v3.id, status="succeeded", started_at=T0 + timedelta(hours=3),
                finished_at=T0 + timedelta(hours=3, minutes=5), summary=gate_v3),
    ])  # fmt: skip
    transition(session, v2, S.GATED, "loop", "gate passed", gate_v2)
    transition(session, v2, S.CANARY, "loop", "canary started")
    set_weights(session, "support", {None: 0.95, v2.id: 0.05}, "loop", "canary step 0")
    history = [
        {"step": 0, "weight": 0.05, "judged_at": (T0 + timedelta(hours=2)).isoformat(), "passed": True,
         "reasons": ["risk not worse"], "comparisons": {}},
        {"step": 1, "weight": 0.25, "judged_at": (T0 + timedelta(hours=4)).isoformat(), "passed": True,
         "reasons": ["flag rate within bounds"], "comparisons": {}},
    ]  # fmt: skip
    session.add(Rollout(route="support", candidate_id=v2.id, baseline_id=None, status="promoted", step=2,
                        weights=[0.05, 0.25, 1.0], history=history, created_at=T0 + timedelta(hours=1, minutes=10),
                        finished_at=T0 + timedelta(hours=5)))  # fmt: skip
    set_weights(session, "support", {v2.id: 1.0}, "loop", "promoted")
    transition(session, v2, S.ACTIVE, "loop", "canary passed every step")
    transition(session, v3, S.REJECTED, "loop", "gate rejected", gate_v3)
    hours = {"adapter.gated": 1.1, "adapter.canary": 1.2, "adapter.active": 5, "adapter.rejected": 3.1}
    for row in session.scalars(sa.select(AuditLog)):  # lifecycle stamps now(); put them on the story's clock
        row.at = T0 + timedelta(hours=hours.get(row.action, 1.2 if row.detail.get("why") == "canary step 0" else 5))
    for i in range(12):  # 3 windows x 2 versions x 2 rows
        window, version = T0 + timedelta(hours=i // 4), "base" if i % 2 else "support/v2"
        req = Request(route="support", endpoint="chat", created_at=window, prompt_text=f"q{i}")
        session.add(req)
        session.flush()
        session.add(OnlineScore(request_id=req.id, route="support", adapter_version=version, window_start=window,
                                risk=0.1 * (i % 5), flagged=i % 3 == 0, overridden=None if i % 4 == 0 else i % 5 == 0,
                                correct=None if i == 5 else version != "base" or i % 3 == 0, latency_ms=100.0 + i))
        reason = ("held", "sampled", "priority")[i % 3]
        decided = window + timedelta(minutes=20) if i < 9 else None
        session.add(ReviewItem(request_id=req.id, reason=reason, status="decided" if decided else "pending",
                               created_at=window + timedelta(minutes=1), decided_at=decided,
                               final_verdict="approve" if decided else None))  # fmt: skip
    session.add_all([
        _drift_run(T0, 0.55, False, []),
        _drift_run(T0 + timedelta(hours=1), 0.72, False, [{"text": "old question", "score": 0.6}]),
        _drift_run(T0 + timedelta(hours=2), 0.91, True, [{"text": HOSTILE, "score": 0.97},
                                                         {"text": "how do I cancel the new plan?", "score": 0.95}]),
    ])  # fmt: skip
    session.commit()


def _html(result) -> str:
    return result.html_path.read_text(encoding="utf-8")


def test_full_report(session, tmp_path):
    _fill(session)
    out = tmp_path / "report"
    result = write_report(session, out)
    html = _html(result)
    assert result.html_path == out / "index.html"
    for version in ("support/v2", "support/v3"):
        assert version in html
    # the gate's numbers, both decisions
    for number in ("0.813", "0.647", "0.000123", "0.021", "-0.012", "150 / 120", "0.777", "0.8765", "130 / 120"):
        assert number in html, number
    assert "passed" in html and "rejected" in html
    # the canary's steps
    assert "risk not worse" in html and "flag rate within bounds" in html and "25%" in html
    assert "promoted" in html
    names = {p.name for p in result.plots}
    assert names == {"quality.png", "rates.png", "drift.png", "reviews.png", "timeline.png"}
    for path in result.plots:
        assert path.parent == out and f'src="{path.name}"' in html
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert "No data yet" not in html
    assert "how do I cancel the new plan?" in html and "old question" not in html  # the latest run's list
    summary = json.loads((out / "report.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["counts"]["online_scores"] == 12 and summary["counts"]["reviews_decided"] == 9
    assert summary["counts"]["gates"] == 2 and summary["counts"]["drift_runs"] == 3
    latest = summary["latest_quality"]["support"]
    assert set(latest) == {"base", "support/v2"}
    assert latest["support/v2"]["quality"] == 1.0 and latest["support/v2"]["n"] == 2
    assert summary["rollouts"][0]["candidate"] == "support/v2" and summary["rollouts"][0]["status"] == "promoted"
    assert summary["rollouts"][0]["judged_steps"] == 2


def test_quality_aggregates_per_window(session, tmp_path):
    _fill(session)
    summary = write_report(session, tmp_path / "r").summary
    base = summary["latest_quality"]["support"]["base"]  # window 2: i = 9, 11
    assert base["n"] == 2 and base["quality"] == 0.5 and base["flag_rate"] == 0.5
    assert base["override_rate"] == 0.0 and base["judged"] == 2


def test_empty_database_says_no_data_yet(session, tmp_path):
    result = write_report(session, tmp_path / "empty", title="empty loop")
    html = _html(result)
    assert result.plots == [] and "<img" not in html
    assert html.count("No data yet") >= 6
    for section in ("Quality per adapter version", "Drift", "Review throughput", "Adapter timeline"):
        assert section in html
    summary = json.loads((tmp_path / "empty" / "report.json").read_text())
    assert summary["counts"]["online_scores"] == 0 and summary["rollouts"] == [] and summary["plots"] == []


def test_hostile_question_is_escaped(session, tmp_path):
    _fill(session)
    html = _html(write_report(session, tmp_path / "r"))
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html


def test_malformed_summaries_do_not_break_the_report(session, tmp_path):
    session.add_all([
        EvalRun(kind="online", status="succeeded", summary={"drift": {"embedding": "oops", "risk": None}}),
        EvalRun(kind="online", status="succeeded", summary=None),
        EvalRun(kind="gate", status="failed", summary={"test": {"p_value": "n/a"}}),
    ])  # fmt: skip
    session.commit()
    html = _html(write_report(session, tmp_path / "r"))
    assert "Gate decisions" in html and "n/a" in html
