"""The demo's live traffic: the gateway in front of vLLM, guardrails holding doubtful answers,
simulated reviewers answering from ground truth, held clients receiving the reviewed answers.

Everything goes through the real parts: the gateway app under uvicorn (in a thread of this
process), the OpenAI SDK as the application, the review HTTP API as the reviewers, the database
as the only shared state. The gateway is imported here, inside the function: this module is part
of the composition layer (the CLI and the demo), which is the one place allowed to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.db import make_engine, session_factory, session_scope
from core.io import write_jsonl
from core.keys import create_key, revoke
from core.settings import Settings
from training.domain import Domain
from tunegate.serve import ServerThread


@dataclass
class TrafficReport:
    asked: int
    decisions: dict[str, int]
    wrong_answers: int
    wrong_held: int  # hallucinations the guardrails caught
    right_held: int  # correct answers held anyway (reviewers approve them)
    corrected: int
    approved: int
    delivered_after_review: int
    examples: int

    def to_dict(self) -> dict:
        return self.__dict__ | {
            "hallucination_recall": round(self.wrong_held / self.wrong_answers, 3) if self.wrong_answers else None
        }


def live_traffic(settings: Settings, vllm_url: str, domain: Domain, out: Path, n_new: int = 20, n_old: int = 10):
    """Send questions about new (drift) and old tariffs through the gateway; review what it holds."""
    import openai

    kb = write_jsonl(out / "knowledge_base.jsonl", ({"text": p} for p in domain.knowledge_base.values()))
    data = settings.model_dump()
    data["vllm"]["url"] = vllm_url
    data["review"]["sample_rate"] = 0.0
    data["routes"] = {
        "support": {
            "targets": [{"adapter": None}],  # the base model: the drift is not learnt yet
            "knowledge_base": str(kb),
            "policy": {"annotate_at": 0.3, "hold_at": 0.5, "block_at": 1.01},
        }
    }
    demo_settings = type(settings).model_validate(data)
    with session_scope(session_factory(make_engine(settings.database_url))) as session:
        app_key = create_key(session, "demo-app", "app")[0]
        revoke(session, "demo-reviewer")  # a reviewer name is one identity: the last run's key goes first
        reviewer_key = create_key(session, "demo-reviewer", "reviewer")[0]
    facts = domain.new_facts[:n_new] + domain.old_facts[:n_old]
    truth = {f.train_questions[0]: f.answer for f in facts}
    decisions: dict[str, int] = {}
    held: dict[str, str] = {}  # review id -> question
    wrong = wrong_held = right_held = 0
    from gateway.app import create_app

    with ServerThread(create_app(demo_settings)) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=app_key, max_retries=0)
        for fact in facts:
            question = fact.train_questions[0]  # live traffic may become training data: never a test question
            raw = client.chat.completions.with_raw_response.create(
                model="support", messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0
            )
            if raw.status_code == 202:
                body = json.loads(raw.text)
                held[body["id"]] = question
                decisions["hold"] = decisions.get("hold", 0) + 1
                answer = None
            else:
                resp = raw.parse()
                decision = (resp.model_extra or {}).get("tunegate", {}).get("decision", "allow")
                decisions[decision] = decisions.get(decision, 0) + 1
                answer = resp.choices[0].message.content
            # Whether the model was right, for the report: a held answer is read by the reviewer below.
            if answer is not None and answer.strip() != fact.answer:
                wrong += 1

        # Simulated reviewers: claim each held item and judge it against the ground truth.
        reviewer = {"Authorization": f"Bearer {reviewer_key}"}
        corrected = approved = 0
        while True:
            claim = httpx.post(gw.url + "/v1/review/claim", headers=reviewer, timeout=30)
            if claim.status_code == 204:
                break
            item = claim.json()
            expected = truth[next(q for i, q in held.items() if i == item["id"])]
            if (item["answer"] or "").strip() == expected:
                right_held += 1
                approved += 1
                decision = {"verdict": "approve", "reason": "matches the tariff sheet"}
            else:
                wrong += 1
                wrong_held += 1
                corrected += 1
                decision = {
                    "verdict": "edit",
                    "corrected_answer": expected,
                    "reason": "corrected from the tariff sheet",
                }
            httpx.post(gw.url + f"/v1/review/items/{item['id']}/decision", headers=reviewer, json=decision, timeout=30)

        # The held clients poll and receive what the reviewers decided.
        app = {"Authorization": f"Bearer {app_key}"}
        delivered = 0
        for review_id, question in held.items():
            outcome = httpx.get(gw.url + f"/v1/reviews/{review_id}", headers=app, timeout=30).json()
            delivered += outcome.get("answer") == truth[question]
    from sqlalchemy import func, select

    from core.db import Dataset, Example

    with session_factory(make_engine(settings.database_url))() as session:
        examples = session.scalar(
            select(func.count()).select_from(Example).join(Dataset).where(Dataset.name == "reviewed")
        )
    return TrafficReport(len(facts), decisions, wrong, wrong_held, right_held, corrected, approved, delivered,
                         int(examples or 0))  # fmt: skip
