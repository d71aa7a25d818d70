"""The request path without a model: one way through (plan, vLLM, verdict, answer, record), SSE framing,
one recorder with the same privacy rules for the traffic log and the review queue, the guard's plan,
and vLLM's adapter endpoints through the breaker.

vLLM is an `httpx.MockTransport` (`create_app(transport=...)`); the guard is a stub handed to a
`CompletionService` through `app.dependency_overrides` (no global is patched).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from core.db import Request, ReviewItem, make_engine, session_factory, session_scope, upgrade
from core.keys import create_key
from core.settings import GatewaySettings, load_settings
from core.vllm import VllmError, load_adapter_async, unload_adapter_async
from core.vocab import Decision, ReviewReason
from gateway.app import create_app
from gateway.deps import RateLimiter, get_completions
from gateway.errors import UpstreamUnavailable
from gateway.guarding import Assessment, GuardService, Plan
from gateway.metrics import Metrics
from gateway.openai.service import REFUSAL, CompletionService
from gateway.recorder import private
from gateway.routing import AdapterManager, Target
from gateway.upstream import DONE, Upstream, sse
from guardrails.types import CheckInput

PII_QUESTION = "Mail the tariff to jane@example.com please"
ANSWER = "Sent to jane@example.com: T896 is available in Leeds."


class FakeVllm:
    """vLLM's OpenAI API as a mock transport: answers ANSWER (and extra choices when asked for n > 1)."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.payloads.append(body)
        n, chat = body.get("n", 1), request.url.path.endswith("/chat/completions")
        logprobs = {"content": [{"token": "Sent", "logprob": -0.1, "top_logprobs": []}]} if chat else None
        if not body.get("stream"):
            choices = [
                {"index": i, "finish_reason": "stop", "logprobs": logprobs}
                | ({"message": {"role": "assistant", "content": ANSWER if i == 0 else f"sample {i}"}} if chat else {})
                | ({} if chat else {"text": ANSWER if i == 0 else f"sample {i}"})
                for i in range(n)
            ]
            usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
            answer = {"id": "x", "object": "chat.completion", "choices": choices, "usage": usage}
            return httpx.Response(200, json=answer)
        events = []
        for word in ANSWER.split(" "):
            choice = {"index": 0, "finish_reason": None}
            choice |= {"delta": {"content": word + " "}} if chat else {"text": word + " "}
            events.append({"id": "x", "object": "chat.completion.chunk", "model": body["model"], "choices": [choice]})
        events.append({"id": "x", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}})
        text = "".join(sse(e).decode() for e in events) + sse(DONE).decode()
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


@dataclass
class StubGuard:
    """The guard's two questions, answered as the test says; remembers what it was asked to judge."""

    plan_: Plan
    decision: Decision
    checked: list[CheckInput] = field(default_factory=list)

    def plan(self, route: str, sampling: bool) -> Plan:
        return self.plan_

    async def verdict(self, route: str, plan: Plan, check: CheckInput) -> Assessment:
        self.checked.append(check)
        review = ReviewReason.HELD if self.decision == Decision.HOLD else None
        if review is None and plan.sample_for_review and self.decision != Decision.BLOCK:
            review = ReviewReason.SAMPLED
        return Assessment(0.9, self.decision, [], "context with jane@example.com", 0.001, [(9, 25)], review)


@pytest.fixture
def gateway(tmp_path):
    """A gateway over the fake vLLM, masking PII; `use(guard)` hands its completion service a stub guard."""
    vllm = FakeVllm()
    settings = load_settings(
        None,
        var_dir=tmp_path,
        vllm={"url": "http://vllm.test"},
        guardrails={"enabled": False},
        gateway={"mask_pii": True, "key_cache_s": 0, "log_flush_interval_s": 0.02, "background_tasks": False},
    )
    upgrade(settings.database_url)
    sessions = session_factory(make_engine(settings.database_url))
    with session_scope(sessions) as session:
        key = create_key(session, "app", "app")[0]
    app = create_app(settings, transport=httpx.MockTransport(vllm))
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        real = app.state.services.completions

        def use(guard: StubGuard) -> None:
            stub = CompletionService(RateLimiter(), real.router, real.adapters, real.upstream, guard, real.recorder)
            app.dependency_overrides[get_completions] = lambda: stub

        yield client, use, vllm, sessions


def chat(client: TestClient, **extra) -> httpx.Response:
    body = {"model": "base", "messages": [{"role": "user", "content": PII_QUESTION}], "max_tokens": 8, **extra}
    return client.post("/v1/chat/completions", json=body)


def stored(sessions) -> list[tuple[Request, ReviewItem | None]]:
    """The stored requests with their review items, once the traffic log's writer has had its turn."""
    deadline = time.monotonic() + 5
    while True:
        time.sleep(0.1)  # the writer flushes every 0.02 s on the app's own thread
        with sessions() as session:
            rows = session.scalars(select(Request)).all()
            if rows or time.monotonic() > deadline:
                return [(r, session.scalar(select(ReviewItem).where(ReviewItem.request_id == r.id))) for r in rows]


def test_sse_framing():
    assert sse({"a": 1}) == b'data: {"a": 1}\n\n'
    assert sse(DONE) == b"data: [DONE]\n\n"


def test_a_held_answer_is_stored_once_masked_with_its_review_item(gateway):
    client, use, _, sessions = gateway
    use(StubGuard(Plan(buffer=True), Decision.HOLD))
    resp = chat(client)
    assert resp.status_code == 202 and resp.json()["object"] == "review"
    (row, item), *others = stored(sessions)
    assert not others and item is not None and item.reason == "held" and resp.json()["id"] == item.id
    assert "[EMAIL]" in row.prompt_text and "jane@" not in row.answer_text and row.status_code == 202
    assert row.request_json["messages"][0]["content"] == "Mail the tariff to [EMAIL] please"  # structure kept
    assert row.guardrail_scores["context"] == "context with [EMAIL]"
    assert row.guardrail_scores["unsupported_spans"] == []  # masking moved the answer's characters


def test_a_sampled_answer_reaches_the_client_whole_and_the_queue_masked(gateway):
    client, use, _, sessions = gateway
    use(StubGuard(Plan(sample_for_review=True), Decision.ALLOW))
    resp = chat(client)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == ANSWER
    (row, item), *others = stored(sessions)
    assert not others and item.reason == "sampled" and row.decision == "allow"
    assert row.answer_text == "Sent to [EMAIL]: T896 is available in Leeds."


def test_the_traffic_log_path_masks_the_same_way(gateway):
    client, use, _, sessions = gateway
    use(StubGuard(Plan(), Decision.ANNOTATE))
    resp = chat(client)
    assert resp.json()["tunegate"]["decision"] == "annotate"
    (row, item), *others = stored(sessions)
    assert not others and item is None and row.answer_text == "Sent to [EMAIL]: T896 is available in Leeds."
    assert row.response_json["choices"][0]["message"]["content"] == row.answer_text


def test_the_plan_shapes_the_vllm_request_and_the_client_sees_only_its_choices(gateway):
    client, use, vllm, _ = gateway
    guard = StubGuard(Plan(logprobs=True, samples=2), Decision.ALLOW)
    use(guard)
    resp = chat(client, temperature=0.7)
    assert vllm.payloads[-1]["n"] == 3 and vllm.payloads[-1]["logprobs"] is True
    body = resp.json()
    assert len(body["choices"]) == 1 and body["choices"][0]["logprobs"] is None and body["model"] == "base"
    check = guard.checked[-1]
    assert check.samples == ["sample 1", "sample 2"] and check.token_logprobs == [-0.1]
    assert check.question == PII_QUESTION and check.answer == ANSWER


def events(resp: httpx.Response) -> list:
    assert resp.text.endswith("\n\n")
    out = []
    for block in resp.text.split("\n\n")[:-1]:
        assert block.startswith("data: ")
        data = block[len("data: ") :]
        out.append(data if data == DONE else json.loads(data))
    return out


def test_a_live_stream_passes_through_and_ends_with_the_risk_event(gateway):
    client, use, _, sessions = gateway
    use(StubGuard(Plan(), Decision.ANNOTATE))
    got = events(chat(client, stream=True))
    assert got[-1] == DONE and got[-2]["choices"] == [] and got[-2]["tunegate"]["decision"] == "annotate"
    assert "".join(e["choices"][0]["delta"]["content"] for e in got[:-2]).strip() == ANSWER
    (row, _), *_ = stored(sessions)
    assert row.stream and row.completion_tokens == 7


def test_a_buffered_completion_stream_is_refused_when_blocked(gateway):
    client, use, _, _ = gateway
    use(StubGuard(Plan(buffer=True), Decision.BLOCK))
    resp = client.post("/v1/completions", json={"model": "base", "prompt": "Where?", "stream": True})
    blocked, risk, done = events(resp)
    assert blocked["choices"] == [{"index": 0, "text": REFUSAL, "finish_reason": "content_filter"}]
    assert risk["tunegate"]["decision"] == "block" and done == DONE


def test_private_applies_store_text_and_mask_pii():
    row = {
        "prompt_text": "user: call +44 20 7946 0958",
        "answer_text": "ok",
        "request_json": {"messages": [{"role": "user", "content": "call +44 20 7946 0958"}]},
        "response_json": None,
        "guardrail_scores": {
            "scores": {"grounding": 0.2},
            "context": "c",
            "evidence": {},
            "unsupported_spans": [[0, 2]],
        },
    }
    assert private(row, GatewaySettings()) is row
    masked = private(row, GatewaySettings(mask_pii=True))
    assert masked["prompt_text"] == "user: call [PHONE]" and masked["guardrail_scores"]["unsupported_spans"] == [[0, 2]]
    bare = private(row, GatewaySettings(store_text=False))
    assert bare["prompt_text"] is bare["request_json"] is bare["answer_text"] is None
    assert bare["guardrail_scores"] == {"scores": {"grounding": 0.2}, "unsupported_spans": [[0, 2]]}
    assert row["prompt_text"].endswith("0958")  # the caller's row is left as it was


def test_the_guards_plan(tmp_path):
    off = GuardService(load_settings(None, var_dir=tmp_path, guardrails={"enabled": False}))
    assert off.plan("base", sampling=True) == Plan()
    settings = load_settings(
        None,
        var_dir=tmp_path,
        guardrails={"detectors": ["grounding", "uncertainty", "consistency"], "consistency_samples": 2},
        review={"sample_rate": 1.0},
        routes={"open": {"targets": [{"adapter": None}], "policy": {"hold_at": 1.01, "block_at": 1.01}}},
    )
    guard = GuardService(settings)
    plan = guard.plan("base", sampling=True)
    assert plan == Plan(logprobs=True, samples=2, buffer=True, sample_for_review=True)
    assert guard.plan("base", sampling=False).samples == 0  # greedy samples would all agree
    assert guard.plan("open", sampling=True).buffer is False  # a route that cannot hold streams live


def adapter_upstream(handler, **gateway) -> Upstream:
    settings = GatewaySettings(connect_retries=0, breaker_failures=1, breaker_reset_s=60, **gateway)
    return Upstream("http://vllm.test", settings, transport=httpx.MockTransport(handler))


def test_adapters_load_through_the_shared_client_and_the_breaker(tmp_path):
    calls: list[str] = []

    def vllm(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v1/load_lora_adapter" and json.loads(request.content)["lora_name"] == "again":
            return httpx.Response(400, text="The lora adapter 'again' has already been loaded.")
        if request.url.path == "/v1/unload_lora_adapter":
            return httpx.Response(404, text="not loaded")
        return httpx.Response(200, text="ok")

    async def run():
        upstream = adapter_upstream(vllm)
        metrics = Metrics()
        adapters = AdapterManager(upstream, capacity=1, metrics=metrics)
        await adapters.ensure(Target("a", "again", 1, "a/v1", tmp_path))  # "already loaded" is loaded
        await adapters.ensure(Target("b", "fresh", 2, "b/v1", tmp_path))  # evicts `again`; its unload fails softly
        with pytest.raises(VllmError, match="unloading adapter `x` failed"):
            await unload_adapter_async(upstream.post, "x")
        await upstream.aclose()
        return list(adapters.loaded), metrics

    loaded, metrics = asyncio.run(run())
    assert loaded == ["fresh"]
    assert calls == ["/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/load_lora_adapter"] + [
        "/v1/unload_lora_adapter"
    ]
    labels = {"adapter": "again", "operation": "unload", "result": "error"}
    assert metrics.registry.get_sample_value("tunegate_adapter_operations_total", labels) == 1


def test_an_adapter_load_fails_fast_while_the_circuit_is_open(tmp_path):
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async def run():
        upstream = adapter_upstream(down)
        adapters = AdapterManager(upstream, capacity=2, metrics=Metrics())
        target = Target("a", "a-v1", 1, "a/v1", Path(tmp_path))
        with pytest.raises(UpstreamUnavailable, match="unavailable"):
            await adapters.ensure(target)
        assert upstream.breaker.is_open
        with pytest.raises(UpstreamUnavailable, match="failing fast"):
            await load_adapter_async(upstream.post, "a-v1", Path(tmp_path))
        await upstream.aclose()

    asyncio.run(run())
