"""The demo's world: applications asking the gateway, and reviewers working its queue.

Everything goes through the real parts: the gateway app under uvicorn (in a thread of this process)
in front of vLLM, the OpenAI SDK as the application, the review HTTP API as the reviewers, the
database as the only shared state. The reviewers are simulated: they answer what they are shown from
the embedded domain's ground truth (the tariff sheet), as a person with the sheet would. Nothing else
here reads the ground truth; what the loop learns, it learns from their verdicts.
The gateway is imported inside `DemoWorld.__enter__`: this module is part of the composition layer
(the CLI and the demo), the one place allowed to.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from core.db import make_engine, session_factory, session_scope
from core.io import normalise_answer
from core.keys import create_key, revoke
from core.settings import Settings
from training.domain import Domain
from tunegate.serve import ServerThread


@dataclass
class Asked:
    """What one batch of traffic did."""

    asked: int = 0
    decisions: Counter = field(default_factory=Counter)
    errors: int = 0

    def to_dict(self) -> dict:
        return {"asked": self.asked, "decisions": dict(self.decisions), "errors": self.errors}


@dataclass
class Reviewed:
    approved: int = 0
    corrected: int = 0
    rejected: int = 0
    by_reason: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.approved + self.corrected + self.rejected

    def to_dict(self) -> dict:
        return {
            "approved": self.approved,
            "corrected": self.corrected,
            "rejected": self.rejected,
            "by_reason": dict(self.by_reason),
        }


class DemoWorld:
    """A gateway in front of vLLM with an application key and a reviewer key (use as a context manager)."""

    def __init__(self, settings: Settings, domain: Domain, route: str = "support") -> None:
        self.settings, self.domain, self.route = settings, domain, route
        # The reviewers' tariff sheet: every phrasing of every fact -> its answer.
        self.sheet = {
            normalise_answer(q): f.answer
            for f in domain.facts
            for q in (*f.train_questions, *f.heldout_questions, f.unseen_question)
        }
        with session_scope(session_factory(make_engine(settings.database_url))) as session:
            revoke(session, "demo-app")
            self.app_key = create_key(session, "demo-app", "app")[0]
            revoke(session, "demo-reviewer")  # a reviewer name is one identity: the last run's key goes first
            self.reviewer_key = create_key(session, "demo-reviewer", "reviewer")[0]
        self.held: dict[str, str] = {}  # review id -> question, of clients still waiting

    def __enter__(self) -> DemoWorld:
        import openai

        from gateway.app import create_app

        self.server = ServerThread(create_app(self.settings)).__enter__()
        self.url = self.server.url
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=self.app_key, max_retries=0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    def ask(self, questions: list[tuple[str, str]]) -> Asked:
        """Each (user, question) through the gateway as the application would; held answers wait."""
        result = Asked()
        for user, question in questions:
            result.asked += 1
            try:
                raw = self.client.chat.completions.with_raw_response.create(
                    model=self.route,
                    messages=[{"role": "user", "content": question}],
                    max_tokens=16,
                    temperature=0,
                    user=user,
                )
            except Exception:  # an error answer is part of what the canary compares
                result.errors += 1
                continue
            body = json.loads(raw.text)
            if raw.status_code == 202:
                self.held[body["id"]] = question
                result.decisions["hold"] += 1
            else:
                result.decisions[(body.get("tunegate") or {}).get("decision", "allow")] += 1
        return result

    def review(self, limit: int = 10_000) -> Reviewed:
        """The reviewers work the queue through the review API until it is empty: approve what matches
        the tariff sheet, correct what does not."""
        reviewer = {"Authorization": f"Bearer {self.reviewer_key}"}
        done = Reviewed()
        while done.total < limit:
            claim = httpx.post(self.url + "/v1/review/claim", headers=reviewer, timeout=30)
            if claim.status_code == 204:
                break
            claim.raise_for_status()
            item = claim.json()
            truth = self.sheet.get(normalise_answer(item["question"]))
            done.by_reason[item["reason"]] += 1
            if truth is None:
                decision = {"verdict": "reject", "reason": "not a question the tariff sheet answers"}
                done.rejected += 1
            elif normalise_answer(item["answer"] or "") == normalise_answer(truth):
                decision = {"verdict": "approve", "reason": "matches the tariff sheet"}
                done.approved += 1
            else:
                decision = {"verdict": "edit", "corrected_answer": truth, "reason": "corrected from the tariff sheet"}
                done.corrected += 1
            httpx.post(
                self.url + f"/v1/review/items/{item['id']}/decision", headers=reviewer, json=decision, timeout=30
            ).raise_for_status()
        return done

    def deliver(self) -> int:
        """The held clients poll and receive what the reviewers decided; returns how many got an answer."""
        app = {"Authorization": f"Bearer {self.app_key}"}
        delivered = 0
        for review_id in list(self.held):
            outcome = httpx.get(self.url + f"/v1/reviews/{review_id}", headers=app, timeout=30).json()
            if outcome.get("status") in ("decided", "expired"):
                delivered += outcome.get("answer") is not None
                del self.held[review_id]
        return delivered

    def settle(self, seconds: float = 0.6) -> None:
        """Give the traffic log its flush interval, so the worker scores what was just asked."""
        time.sleep(max(seconds, 2 * self.settings.gateway.log_flush_interval_s))
