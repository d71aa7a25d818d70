"""`tunegate demo --json` end to end: the closed loop on the embedded default, through the real parts (vLLM,
the gateway, the review API, the worker's passes, TRL), in a folder of its own. It checks what the loop
did, not how fast or how well it learnt (that is the demo's measurement, reported in its JSON)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa

from tests.conftest import MODELS_DIR

KEYS = (
    "accuracy_before_drift", "accuracy_on_drift_before_retrain", "accuracy_on_drift_after_retrain",
    "accuracy_on_unreviewed_drift_after", "accuracy_unseen_template_after", "holdout_accuracy_before",
    "holdout_accuracy_after", "flagged", "reviewed", "labels_used", "gate", "canary_steps",
    "bad_candidate_outcome", "loop_seconds", "total_seconds",
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.vllm
def test_the_demo_runs_the_loop_on_reviewed_labels(tmp_path, base_model_dir):
    var = tmp_path / "var"
    var.mkdir()
    (var / "models").symlink_to(MODELS_DIR.resolve())  # the base model the session already built
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEGATE_")} | {"TUNEGATE_VAR_DIR": str(var)}
    done = subprocess.run(
        [sys.executable, "-m", "tunegate.cli", "demo", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(KEYS) <= set(result)

    # The good candidate: trained on reviewed labels, passed the gate, walked the canary to 100 %.
    assert result["gate"]["decision"] == "passed", result["gate"]
    assert result["gate"]["test"]["n"] >= result["gate"]["required_items"]
    assert [s["weight"] for s in result["canary_steps"]] == [0.1, 0.5, 1.0]
    assert all(s["passed"] for s in result["canary_steps"])
    assert result["route_now"] == [{"version": "support/v1", "status": "active", "weight": 1.0}]
    assert result["labels_used"] > 0 and result["reviewed"] >= result["labels_used"]
    # It learnt the drift from the reviewers, and kept what the base model knew.
    assert result["accuracy_on_drift_after_retrain"] > result["accuracy_on_drift_before_retrain"] + 0.3
    assert result["holdout_accuracy_after"] >= result["holdout_accuracy_before"] - 0.05
    # The bad candidate (corrupted labels) never reached all the traffic.
    assert result["bad_candidate_outcome"] in ("rejected_at_gate", "rolled_back")
    assert result["bad_candidate_max_share"] < 1.0

    # What the loop learnt came through review: the training snapshot holds every training-side reviewed
    # example (the conversation a reviewer saw with the answer the reviewer gave) and each of those
    # examples belongs to a request whose review item was decided.
    from core.db import Example, Job, ReviewItem, make_engine
    from core.vocab import ReviewStatus

    engine = make_engine(f"sqlite:///{var / 'demo' / 'run' / 'tunegate.db'}")
    with engine.connect() as connection:
        job = connection.execute(
            sa.select(Job.payload, Job.created_at).where(Job.kind == "train").order_by(Job.id)
        ).first()
        labels = connection.execute(
            sa.select(Example.messages, Example.created_at, ReviewItem.status, ReviewItem.final_answer)
            .join(ReviewItem, ReviewItem.request_id == Example.source_request_id)
            .where(Example.split == "train")
        ).all()
    engine.dispose()
    payload, filed_at = job
    snapshot = [json.loads(line)["messages"] for line in open(payload["snapshot"])]
    assert payload["counts"]["reviewed_labels"] == result["labels_used"] > 0
    # The labels there were when the trigger filed the job are all in its snapshot (later ones are not
    # counted, though a later label can repeat an earlier conversation word for word).
    known = [
        messages
        for messages, created_at, _, _ in labels
        if created_at.replace(tzinfo=None) <= filed_at.replace(tzinfo=None)
    ]
    assert len(known) == payload["counts"]["reviewed_labels"]
    assert all(messages in snapshot for messages in known)
    for messages, _, status, final_answer in labels:
        assert status == ReviewStatus.DECIDED and messages[-1]["content"] == final_answer
