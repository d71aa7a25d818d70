"""The guard sees everything that goes out: every choice of `n` > 1 and every prompt of a prompt list is
judged, the worst decision (block > hold > annotate > allow) decides for the whole response, and what
is stored for review is the prompt and answer the reviewer judges.

vLLM is an `httpx.MockTransport` that answers every prompt and choice distinctly; the gateway is the one
`tests.test_gateway_path` builds, with a guard that decides by the answer's text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx
import pytest

from core.vocab import Decision, ReviewReason
from gateway.deps import RateLimiter, get_completions
from gateway.guarding import Assessment, Plan, worst
from gateway.openai.service import REFUSAL, CompletionService
from gateway.upstream import DONE, Upstream, sse
from guardrails.types import CheckInput
from tests.test_gateway_path import StubGuard, chat, events, gateway, stored  # noqa: F401 - a fixture


def answer_text(prompt: str, choice: int) -> str:
    return f"answer {choice} to {prompt}"


def batch_vllm(request: httpx.Request) -> httpx.Response:
    """vLLM's numbering: choice `j` of prompt `p` is `index` p * n + j, in whole answers and streams."""
    body = json.loads(request.content)
    n, is_chat = body.get("n", 1), request.url.path.endswith("/chat/completions")
    prompt = body.get("prompt", "chat")
    prompts = prompt if isinstance(prompt, list) else [prompt]
    choices = []
    for p, text in enumerate(prompts):
        for j in range(n):
            answer = answer_text(text, j)
            choice = {"index": p * n + j, "finish_reason": "stop"}
            part = "delta" if body.get("stream") else "message"
            choices.append(choice | ({part: {"role": "assistant", "content": answer}} if is_chat else {"text": answer}))
    if not body.get("stream"):
        return httpx.Response(200, json={"id": "x", "object": "completion", "choices": choices})
    text = "".join(sse({"id": "x", "choices": [c]}).decode() for c in choices) + sse(DONE).decode()
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


@dataclass
class JudgingGuard(StubGuard):
    """Decides by the answer: the first rule whose text the answer contains, else `decision`."""

    rules: dict[str, Decision] = field(default_factory=dict)

    async def verdict(self, route: str, plan: Plan, check: CheckInput) -> Assessment:
        self.checked.append(check)
        decision = next((d for text, d in self.rules.items() if text in check.answer), self.decision)
        review = ReviewReason.HELD if decision == Decision.HOLD else None
        risk = {Decision.ALLOW: 0.1, Decision.ANNOTATE: 0.5, Decision.HOLD: 0.7, Decision.BLOCK: 0.9}[decision]
        return Assessment(risk, decision, [], None, 0.001, [], review)


@pytest.fixture
def judged(gateway):  # noqa: F811 - the imported fixture
    client, _, _, sessions = gateway
    real = client.app.state.services.completions
    upstream = Upstream("http://vllm.test", real.upstream.settings, transport=httpx.MockTransport(batch_vllm))

    def use(plan: Plan, **rules: Decision) -> JudgingGuard:
        guard = JudgingGuard(plan, Decision.ALLOW, rules={text.replace("_", " "): d for text, d in rules.items()})
        stub = CompletionService(RateLimiter(), real.router, real.adapters, upstream, guard, real.recorder)
        client.app.dependency_overrides[get_completions] = lambda: stub
        return guard

    return client, use, sessions


def test_the_worst_decision_decides():
    a = [Assessment(r, d, [], None, 0, []) for r, d in [(0.2, Decision.HOLD), (0.9, Decision.ANNOTATE)]]
    assert worst(a) == 0 and worst([None, *a, a[0]]) == 1 and worst([None]) is None
    assert (
        worst([Assessment(0.3, Decision.BLOCK, [], None, 0, []), Assessment(0.8, Decision.BLOCK, [], None, 0, [])]) == 1
    )


def test_every_choice_of_n_is_judged_and_one_blocked_choice_blocks_them_all(judged):
    client, use, _ = judged
    guard = use(Plan(), answer_1=Decision.BLOCK)
    body = chat(client, n=2).json()
    assert [c.answer for c in guard.checked] == [answer_text("chat", 0), answer_text("chat", 1)]
    assert body["tunegate"]["decision"] == "block"
    assert [c["message"]["content"] for c in body["choices"]] == [REFUSAL, REFUSAL]


def test_a_live_stream_of_n_choices_is_annotated_by_its_worst_choice(judged):
    client, use, sessions = judged
    guard = use(Plan(), answer_1=Decision.ANNOTATE)
    got = events(chat(client, n=2, stream=True))
    assert len(guard.checked) == 2 and got[-1] == DONE and got[-2]["tunegate"]["decision"] == "annotate"
    (row, _), *_ = stored(sessions)
    assert row.decision == "annotate" and row.answer_text == answer_text("chat", 1)  # the answer that decided


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_every_prompt_of_a_list_is_answered_and_judged(judged, stream):
    client, use, _ = judged
    guard = use(Plan())
    resp = client.post("/v1/completions", json={"model": "base", "prompt": ["Where?", "When?"], "stream": stream})
    choices = [c for e in events(resp)[:-1] for c in e["choices"]] if stream else resp.json()["choices"]
    assert [(c["index"], c["text"]) for c in choices] == [(0, answer_text("Where?", 0)), (1, answer_text("When?", 0))]
    assert [(c.question, c.answer) for c in guard.checked] == [
        ("Where?", answer_text("Where?", 0)),
        ("When?", answer_text("When?", 0)),
    ]


def test_a_held_prompt_of_a_list_holds_the_response_and_is_stored_as_the_reviewer_judges_it(judged):
    client, use, sessions = judged
    guard = use(Plan(buffer=True, samples=1), to_When=Decision.HOLD)
    body = {"model": "base", "prompt": ["Where?", "When?"], "n": 1, "temperature": 0.7}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 202
    # vLLM answered 2 choices per prompt; each prompt's second was its sample
    assert [(c.question, c.answer, c.samples) for c in guard.checked] == [
        ("Where?", answer_text("Where?", 0), [answer_text("Where?", 1)]),
        ("When?", answer_text("When?", 0), [answer_text("When?", 1)]),
    ]
    (row, item), *others = stored(sessions)
    assert not others and item is not None and item.reason == "held" and item.id == resp.json()["id"]
    assert row.request_json["prompt"] == "When?" and row.answer_text == answer_text("When?", 0)
    assert row.prompt_text == "When?" and row.status_code == 202 and row.decision == "hold"
