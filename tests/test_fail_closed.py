"""Fail closed: when the review store is down, an answer that must be held is never released unchecked
(503 in OpenAI's shape), and an answer only sampled for review is still delivered (the failure is
logged and counted). The outage is real: the review service's database cannot be opened."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from core.db import make_engine, session_factory, session_scope, upgrade
from core.keys import create_key
from core.settings import load_settings
from core.vocab import Decision
from gateway.app import create_app
from gateway.deps import RateLimiter, get_completions
from gateway.guarding import Plan
from gateway.openai.service import CompletionService
from gateway.recorder import Recorder
from gateway.review.service import ReviewService

from .test_gateway_path import ANSWER, FakeVllm, StubGuard, chat, stored


@pytest.fixture
def gateway(tmp_path):
    """A gateway whose review store is unreachable; `use(guard)` hands its completion service a stub guard."""
    settings = load_settings(
        None,
        var_dir=tmp_path,
        vllm={"url": "http://vllm.test"},
        guardrails={"enabled": False},
        gateway={"key_cache_s": 0, "log_flush_interval_s": 0.02, "background_tasks": False},
    )
    upgrade(settings.database_url)
    sessions = session_factory(make_engine(settings.database_url))
    with session_scope(sessions) as session:
        key = create_key(session, "app", "app")[0]
    down = session_factory(make_engine(f"sqlite:///{tmp_path / 'missing' / 'review.sqlite'}"))  # cannot be opened
    app = create_app(settings, transport=httpx.MockTransport(FakeVllm()))
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        real = app.state.services.completions
        recorder = Recorder(
            real.recorder.traffic, ReviewService(down, settings.review), real.recorder.metrics, settings.gateway
        )

        def use(guard: StubGuard) -> None:
            stub = CompletionService(RateLimiter(), real.router, real.adapters, real.upstream, guard, recorder)
            app.dependency_overrides[get_completions] = lambda: stub

        yield client, use, sessions, real.recorder.metrics


@pytest.mark.parametrize("stream", [False, True])
def test_a_held_answer_is_not_released_when_the_review_store_is_down(gateway, stream):
    client, use, _, _ = gateway
    use(StubGuard(Plan(buffer=True), Decision.HOLD))
    response = chat(client, stream=stream)
    assert response.status_code == 503, response.text
    assert ANSWER not in response.text and ANSWER.split(" ")[0] not in response.text
    error = error_of(response)
    assert error["code"] == "review_store_unavailable" and error["type"] == "service_unavailable"
    assert response.headers["Retry-After"]
    if response.headers["content-type"].startswith("text/event-stream"):  # a stream ends as streams do
        assert response.text.rstrip().endswith("data: [DONE]")


def error_of(response) -> dict:
    """The OpenAI-shaped error of a JSON answer or of a stream's error event."""
    if not response.headers["content-type"].startswith("text/event-stream"):
        return response.json()["error"]
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    return next(json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e))


def test_a_sampled_answer_is_delivered_when_the_review_store_is_down(gateway):
    client, use, sessions, metrics = gateway
    use(StubGuard(Plan(sample_for_review=True), Decision.ALLOW))
    response = chat(client)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == ANSWER
    assert metrics.registry.get_sample_value("tunegate_review_sample_failures_total") == 1
    ((row, item),) = stored(sessions)  # the row still reaches the traffic log
    assert row.status_code == 200 and item is None
