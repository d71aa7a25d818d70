"""Reviewers' verdicts become calibration labels: `tunegate guard calibrate --from-reviews`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from core.db import make_engine, session_factory, upgrade, utcnow
from core.labels import review_rows
from core.settings import ReviewSettings, load_settings
from gateway.review.service import ReviewService
from training.domain import Domain

from .conftest import REPO


def test_decided_reviews_become_rows_and_calibrate(tmp_path):
    settings = load_settings(None, var_dir=tmp_path)
    upgrade(settings.database_url)
    sessions = session_factory(make_engine(settings.database_url))
    review = ReviewService(sessions, ReviewSettings())
    domain = Domain()
    verdicts = {}
    for i, fact in enumerate(domain.new_facts[:6]):
        wrong = i % 2 == 1
        answer = "Dunmore" if wrong and fact.attribute == "region" else ("99.99 EUR" if wrong else fact.answer)
        asked = [{"role": "user", "content": fact.heldout_questions[0]}]
        row = {"id": f"{i:032x}", "created_at": utcnow(), "route": "support", "endpoint": "chat", "stream": False,
               "status_code": 202, "request_json": {"messages": asked},
               "prompt_text": f"user: {fact.heldout_questions[0]}", "answer_text": answer}  # fmt: skip
        item = review.hold(row, context=domain.knowledge_base[fact.code], scores={"grounding": 0.5})
        verdicts[item] = ("edit", fact.answer) if wrong else ("approve", None)
    for _ in verdicts:
        claimed = review.claim("rita")
        verdict, corrected = verdicts[claimed.id]
        review.decide(claimed.id, "rita", verdict, corrected, reason="checked against the tariff sheet")

    with sessions() as session:
        rows = review_rows(session)
    assert len(rows) == 6 and {r["verdict"] for r in rows} == {"approve", "edit"}
    questions = {q for f in domain.new_facts[:6] for q in f.heldout_questions}
    assert all(r["context"] and r["question"] in questions for r in rows)

    data = tmp_path / "grounding.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in domain.grounding_rows()[:60]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEGATE_")} | {"TUNEGATE_VAR_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "tunegate.cli", "guard", "calibrate", "--data", str(data), "--from-reviews", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["rows"] == 60 + 6 + 3  # each edit also adds its corrected answer as a supported row
    assert (tmp_path / "guardrails" / "calibration.json").exists()
