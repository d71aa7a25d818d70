"""Guardrails on the request path, against a real vLLM: policy per route (allow, annotate, hold, block),
streaming (annotated streams end with a risk event; holding routes buffer), held answers released by
a reviewer's verdict, and risk that follows what the model gets wrong."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from core.db import make_engine, session_factory, session_scope, upgrade
from core.keys import create_key
from core.settings import load_settings
from training.domain import Domain

from .conftest import ServerThread

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

NEVER = 1.01


@pytest.fixture(scope="module")
def env(tmp_path_factory, base_model_dir, vllm_server):
    var = tmp_path_factory.mktemp("guard")
    domain = Domain()
    kb = var / "kb.jsonl"
    kb.write_text("".join(json.dumps({"text": p}) + "\n" for p in domain.knowledge_base.values()))
    base = [{"adapter": None}]
    settings = load_settings(
        None,
        var_dir=var,
        base_model={"path": str(base_model_dir)},
        vllm={"url": vllm_server.url},
        gateway={"key_cache_s": 0, "log_flush_interval_s": 0.05},
        review={"sample_rate": 0.0},
        routes={
            "plain": {"targets": base, "knowledge_base": str(kb),
                      "policy": {"annotate_at": NEVER, "hold_at": NEVER, "block_at": NEVER}},
            "annotated": {"targets": base, "knowledge_base": str(kb),
                          "policy": {"annotate_at": 0.0, "hold_at": NEVER, "block_at": NEVER}},
            "held": {"targets": base, "policy": {"annotate_at": 0.0, "hold_at": 0.0, "block_at": NEVER}},
            "blocked": {"targets": base, "policy": {"annotate_at": 0.0, "hold_at": 0.0, "block_at": 0.0}},
        },
    )  # fmt: skip
    upgrade(settings.database_url)
    keys = {}
    with session_scope(session_factory(make_engine(settings.database_url))) as session:
        for role in ("app", "reviewer"):
            keys[role] = create_key(session, f"g-{role}", role)[0]
    from gateway.app import create_app

    with ServerThread(create_app(settings)) as server:
        yield {"url": server.url, "keys": keys, "domain": domain, "settings": settings}


def client(env) -> openai.OpenAI:
    return openai.OpenAI(base_url=env["url"] + "/v1", api_key=env["keys"]["app"], max_retries=0)


def question(fact) -> list[dict]:
    return [{"role": "user", "content": fact.heldout_questions[0]}]


def test_plain_route_answers_without_annotation(env):
    resp = client(env).chat.completions.create(
        model="plain", messages=question(env["domain"].old_facts[0]), max_tokens=12, temperature=0
    )
    assert resp.choices[0].message.content == env["domain"].old_facts[0].answer
    assert "tunegate" not in (resp.model_extra or {}) and resp.choices[0].logprobs is None


def test_annotated_route_attaches_risk_and_scores(env):
    resp = client(env).chat.completions.create(
        model="annotated", messages=question(env["domain"].old_facts[0]), max_tokens=12, temperature=0
    )
    info = resp.model_extra["tunegate"]
    assert info["decision"] == "annotate" and 0.0 <= info["risk"] <= 1.0
    assert set(info["scores"]) >= {"grounding", "embedding", "uncertainty"}


def test_annotated_stream_ends_with_a_risk_event(env):
    stream = client(env).chat.completions.create(
        model="annotated", messages=question(env["domain"].old_facts[1]), max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == env["domain"].old_facts[1].answer
    assert chunks[-1].choices == [] and chunks[-1].model_extra["tunegate"]["decision"] == "annotate"


def test_held_answer_is_a_202_released_by_a_reviewer(env):
    fact = env["domain"].old_facts[2]
    resp = httpx.post(env["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {env['keys']['app']}"},
                      json={"model": "held", "messages": question(fact), "max_tokens": 12, "temperature": 0,
                            "context": env["domain"].knowledge_base[fact.code]})  # fmt: skip
    assert resp.status_code == 202
    review_id = resp.json()["id"]
    app_headers = {"Authorization": f"Bearer {env['keys']['app']}"}
    pending = httpx.get(env["url"] + f"/v1/reviews/{review_id}", headers=app_headers).json()
    assert pending["status"] in ("pending", "held") and pending.get("answer") is None

    reviewer = {"Authorization": f"Bearer {env['keys']['reviewer']}"}
    item = httpx.post(env["url"] + "/v1/review/claim", headers=reviewer).json()
    assert item["id"] == review_id and item["answer"] == fact.answer
    assert fact.code in (item.get("context") or "")  # the client's context reached the reviewer
    decided = httpx.post(
        env["url"] + f"/v1/review/items/{review_id}/decision",
        headers=reviewer,
        json={"verdict": "edit", "corrected_answer": f"{fact.answer} (checked)", "reason": "ok"},
    )
    assert decided.status_code == 200, decided.text
    outcome = httpx.get(env["url"] + f"/v1/reviews/{review_id}", headers=app_headers).json()
    assert outcome["status"] == "decided" and outcome["answer"] == f"{fact.answer} (checked)"


def test_holding_routes_buffer_streams_and_hold_them(env):
    resp = httpx.post(env["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {env['keys']['app']}"},
                      json={"model": "held", "messages": question(env["domain"].old_facts[3]), "max_tokens": 12,
                            "stream": True})  # fmt: skip
    assert resp.status_code == 202 and resp.json()["object"] == "review"


def test_blocked_route_refuses_with_content_filter(env):
    resp = client(env).chat.completions.create(
        model="blocked", messages=question(env["domain"].old_facts[0]), max_tokens=12, temperature=0
    )
    assert resp.choices[0].finish_reason == "content_filter"
    assert resp.choices[0].message.content != env["domain"].old_facts[0].answer


def test_risk_is_higher_for_what_the_model_does_not_know(env):
    """The base model knows old tariffs and makes up new ones: the guard, grounding answers in the
    route's knowledge base, must see the difference."""
    c, domain = client(env), env["domain"]

    def risks(facts):
        out = []
        for fact in facts:
            resp = c.chat.completions.create(model="annotated", messages=question(fact), max_tokens=12, temperature=0)
            out.append((resp.model_extra["tunegate"]["risk"], resp.choices[0].message.content == fact.answer))
        return out

    old, new = risks(domain.old_facts[:10]), risks(domain.new_facts[:10])
    right = [r for r, ok in old + new if ok]
    wrong = [r for r, ok in old + new if not ok]
    assert len(wrong) >= 5 and len(right) >= 5
    assert sum(wrong) / len(wrong) > sum(right) / len(right) + 0.2
