"""vLLM's answers are untrusted input: malformed JSON, wrong shapes, missing fields, broken stream events
and cut connections are a 502 in OpenAI's shape, logged with that status; a stream that breaks after
its first byte ends with an error event and `data: [DONE]`.

The faulty vLLM is an `httpx.MockTransport` (fault injection); the gateway, its database and keys are
the ones `tests.test_gateway_path` builds.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from core.vocab import Decision
from gateway.deps import RateLimiter, get_completions
from gateway.guarding import Plan
from gateway.openai.service import CompletionService
from gateway.upstream import DONE, Upstream
from tests.test_gateway_path import StubGuard, chat, events, gateway, stored  # noqa: F401 - `gateway` is a fixture

GOOD_CHOICE = {"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}
GOOD_CHUNK = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "fine "}}]}


class CutStream(httpx.AsyncByteStream):
    """A response body that sends `first`, then the connection drops."""

    def __init__(self, first: bytes) -> None:
        self.first = first

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.first
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


class FaultyVllm:
    """Answers every completion with `self.answer`: bytes as the body, or a callable building the response."""

    answer: bytes | object = b"{}"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if callable(self.answer):
            return self.answer(request)
        headers = {
            "content-type": "text/event-stream" if json.loads(request.content).get("stream") else "application/json"
        }
        return httpx.Response(200, content=self.answer, headers=headers)


@pytest.fixture
def faulty(gateway):  # noqa: F811 - the imported fixture
    """The gateway of `tests.test_gateway_path`, its completion service talking to a faulty vLLM."""
    client, _, _, sessions = gateway
    real = client.app.state.services.completions
    vllm = FaultyVllm()
    upstream = Upstream("http://vllm.test", real.upstream.settings, transport=httpx.MockTransport(vllm))

    def use(plan: Plan) -> None:
        guard = StubGuard(plan, Decision.ALLOW)
        stub = CompletionService(RateLimiter(), real.router, real.adapters, upstream, guard, real.recorder)
        client.app.dependency_overrides[get_completions] = lambda: stub

    return client, use, vllm, sessions


def body_of(answer: object) -> bytes:
    return answer if isinstance(answer, bytes) else json.dumps(answer).encode()


def cut_off(request: httpx.Request) -> httpx.Response:
    raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)


WHOLE = {
    "not JSON": b"<html>502 Bad Gateway</html>",
    "JSON cut short": b'{"choices": [{"index": 0, "mess',
    "not an object": [GOOD_CHOICE],
    "no choices": {"id": "x"},
    "choices not a list": {"choices": {"0": GOOD_CHOICE}},
    "a choice not an object": {"choices": ["fine"]},
    "message missing": {"choices": [{"index": 0, "finish_reason": "stop"}]},
    "index missing": {"choices": [{"message": {"role": "assistant", "content": "fine"}}]},
    "content not a string": {"choices": [{"index": 0, "message": {"role": "assistant", "content": {"x": 1}}}]},
    "logprobs malformed": {"choices": [GOOD_CHOICE | {"logprobs": {"content": [{"token": "fine"}]}}]},
    "logprobs not an object": {"choices": [GOOD_CHOICE | {"logprobs": [0.5]}]},
    "usage malformed": {"choices": [GOOD_CHOICE], "usage": {"prompt_tokens": "many"}},
}


@pytest.mark.parametrize("answer", [*WHOLE.values(), cut_off], ids=[*WHOLE, "connection closed"])
def test_a_malformed_answer_is_a_logged_502(faulty, answer):
    client, use, vllm, sessions = faulty
    use(Plan())
    vllm.answer = answer if callable(answer) else body_of(answer)
    resp = chat(client)
    assert resp.status_code == 502
    error = resp.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "bad_upstream_response" and error["message"]
    (row, _), *others = stored(sessions)
    assert not others and row.status_code == 502 and row.decision is None and row.error == error["message"]


def stream(*events: object, done: bool = True) -> bytes:
    text = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)
    return (text + ("data: [DONE]\n\n" if done else "")).encode()


def cut_stream(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200, stream=CutStream(stream(GOOD_CHUNK, done=False)), headers={"content-type": "text/event-stream"}
    )


STREAMS = {
    "an event not JSON": stream(GOOD_CHUNK, "{not json"),
    "an event not an object": stream(GOOD_CHUNK, "[1, 2]"),
    "a chunk without choices": stream(GOOD_CHUNK, {"id": "x", "object": "chat.completion.chunk"}),
    "choices not a list": stream(GOOD_CHUNK, {"id": "x", "choices": "fine"}),
    "delta missing": stream(GOOD_CHUNK, {"id": "x", "choices": [{"index": 0}]}),
    "content not a string": stream(GOOD_CHUNK, {"id": "x", "choices": [{"index": 0, "delta": {"content": 7}}]}),
    "logprobs malformed": stream(
        GOOD_CHUNK, {"id": "x", "choices": [{"index": 0, "delta": {}, "logprobs": {"content": [{"logprob": "x"}]}}]}
    ),
    "no [DONE]": stream(GOOD_CHUNK, done=False),
    "an error event": stream(GOOD_CHUNK, {"error": {"message": "the engine died", "type": "InternalServerError"}}),
}


@pytest.mark.parametrize("answer", [*STREAMS.values(), cut_stream], ids=[*STREAMS, "connection cut"])
def test_a_broken_live_stream_ends_with_an_error_event_and_done(faulty, answer):
    client, use, vllm, sessions = faulty
    use(Plan())  # guardrails that cannot hold: the stream is passed through as it comes
    vllm.answer = answer
    resp = chat(client, stream=True)
    assert resp.status_code == 200  # the first byte was sent before the fault
    got = events(resp)
    assert got[0]["choices"][0]["delta"]["content"] == "fine "
    assert got[-1] == DONE and got[-2]["error"]["code"] == "bad_upstream_response"
    (row, _), *others = stored(sessions)
    assert not others and row.stream and row.status_code == 502


@pytest.mark.parametrize("answer", [*STREAMS.values(), cut_stream], ids=[*STREAMS, "connection cut"])
def test_a_broken_buffered_stream_is_a_502(faulty, answer):
    client, use, vllm, sessions = faulty
    use(Plan(buffer=True))  # a route that can hold: nothing is sent before the whole answer is judged
    vllm.answer = answer
    resp = chat(client, stream=True)
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "bad_upstream_response"
    (row, _), *others = stored(sessions)
    assert not others and row.status_code == 502


def test_a_well_formed_usage_only_chunk_is_accepted(faulty):
    client, use, vllm, sessions = faulty
    use(Plan())
    vllm.answer = stream(GOOD_CHUNK, {"id": "x", "usage": {"prompt_tokens": 2, "completion_tokens": 1}})
    got = events(chat(client, stream=True))
    assert got[-1] == DONE and all("error" not in e for e in got[:-1])
    (row, _), *_ = stored(sessions)
    assert row.status_code == 200 and row.completion_tokens == 1


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"error": {"message": {"nested": True}, "type": 7, "param": ["x"]}}, "vLLM error"),
        ({"object": "error", "message": "`top_k` must be positive", "type": "BadRequestError", "code": 400}, None),
        (["not", "an", "error"], '["not","an","error"]'),  # httpx's compact JSON, quoted
    ],
    ids=["fields of the wrong types", "the older top-level shape", "not an object"],
)
def test_an_error_answer_of_vllm_reaches_the_client_as_openai_shaped_text(faulty, answer, message):
    client, use, vllm, _ = faulty
    use(Plan())
    vllm.answer = lambda request: httpx.Response(400, json=answer)
    resp = chat(client)
    assert resp.status_code == 400  # vLLM's own status passes through
    error = resp.json()["error"]
    assert isinstance(error["message"], str) and isinstance(error["type"], str) and error["param"] is None
    assert error["message"] == (message or answer["message"])
