"""Limits before work, and a corpus of hostile payloads: one request must never cost the gateway more
than its settings allow, nor make it answer 5xx or anything but OpenAI's error shape.

The body size is counted while the body is read (a chunked body without `Content-Length` too), before
it is parsed and before the key is checked; `context`/`documents`, `messages`, `model` and the
`X-TuneGate-User` header have caps of their own (`gateway.limits`). vLLM is a mock transport (the
benchmark's mock upstream's answer); no model runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from fastapi.testclient import TestClient

from bench.mock_upstream import completion
from core.db import make_engine, session_factory, session_scope, upgrade
from core.keys import create_key
from core.settings import load_settings
from gateway.app import create_app
from gateway.limits import BodyLimit
from gateway.upstream import DONE, sse
from tunegate.serve import ServerThread

pytestmark = pytest.mark.timeout(300)  # a hang fails this file, not the whole run

ERROR_KEYS = {"message", "type", "param", "code"}


def mock_vllm(request: httpx.Request) -> httpx.Response:
    """vLLM as the benchmark's mock upstream answers it: a valid chat completion for any model."""
    if request.method == "GET":
        return httpx.Response(200, json={"object": "list", "data": []})
    body, chat = json.loads(request.content), request.url.path.endswith("/chat/completions")
    answer = completion(body.get("model", "mock"))
    if not chat:  # a text completion: its choices carry `text`
        answer |= {"object": "text_completion", "choices": [{"index": 0, "text": "42", "finish_reason": "stop"}]}
    if not body.get("stream"):
        return httpx.Response(200, json=answer)
    delta = {"delta": {"content": "42"}} if chat else {"text": "42"}
    chunk = answer | {"object": "chat.completion.chunk", "choices": [{"index": 0, **delta}]}
    text = sse(chunk).decode() + sse({"id": "x", "choices": [], "usage": answer["usage"]}).decode() + sse(DONE).decode()
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


@contextmanager
def gateway(tmp_path, **gateway_settings) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """A gateway (guardrails off, no background tasks) over the mock vLLM; yields a client and an app key's headers."""
    settings = load_settings(
        None,
        var_dir=tmp_path,
        vllm={"url": "http://vllm.test"},
        guardrails={"enabled": False},
        gateway={"log_flush_interval_s": 0.02, "background_tasks": False, **gateway_settings},
    )
    upgrade(settings.database_url)
    with session_scope(session_factory(make_engine(settings.database_url))) as session:
        key = create_key(session, "app", "app")[0]
    app = create_app(settings, transport=httpx.MockTransport(mock_vllm))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, {"Authorization": f"Bearer {key}"}


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.status_code >= 400, response.text[:500]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["type"], str)
    return body["error"]


@pytest.fixture
def client(tmp_path):
    limits = {"max_body_bytes": 64 * 1024, "max_messages": 8, "max_model_chars": 64, "max_user_header_chars": 32}
    limits |= {"max_context_chars": 4000, "max_context_sentences": 20, "max_documents": 4}
    with gateway(tmp_path, limits=limits) as pair:
        yield pair


def chat_body(**extra) -> dict:
    return {"model": "base", "messages": [{"role": "user", "content": "Is T896 available?"}], **extra}


# --- limits before work -------------------------------------------------------------------------


def test_a_body_past_the_limit_is_413_before_the_key_check(client):
    c, _ = client
    big = json.dumps(chat_body(padding="x" * 70_000)).encode()
    error = assert_openai_error(c.post("/v1/chat/completions", content=big), 413)  # no key sent at all
    assert error["code"] == "request_too_large" and "65536" in error["message"]


def test_a_chunked_body_without_content_length_is_counted_while_read(client):
    c, headers = client
    sent = []

    def chunks():
        yield b'{"model": "base", "messages": [{"role": "user", "content": "'
        for _ in range(1000):  # 1000 x 1 KB, far past the 64 KB limit
            sent.append(1)
            yield b"y" * 1024
        yield b'"}]}'

    response = c.post("/v1/chat/completions", content=chunks(), headers=headers | {"Content-Type": "application/json"})
    assert_openai_error(response, 413)


def test_a_chunked_body_over_real_http_is_refused_while_it_arrives(client):
    """uvicorn, a raw socket, `Transfer-Encoding: chunked` and no `Content-Length`: 413 once 64 KB have come."""
    c, headers = client
    with ServerThread(c.app) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            head += f"Content-Type: application/json\r\nAuthorization: {headers['Authorization']}\r\n\r\n"
            chunk = b"400\r\n" + b"y" * 1024 + b"\r\n"
            with contextlib.suppress(OSError):  # the server may close before all of it is sent
                sock.sendall(head.encode() + b'6\r\n{"a":"\r\n')
                for _ in range(200):  # 200 KB, never finished: no terminating chunk is sent
                    sock.sendall(chunk)
            answer = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                    data = sock.recv(65536)
                    if not data:
                        break
                    answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"413", answer[:300]
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "request_too_large" and set(error) == ERROR_KEYS


def test_a_body_on_any_method_is_counted(client):
    c, headers = client
    response = c.request("GET", "/v1/models", content=b"x" * 70_000, headers=headers)
    assert_openai_error(response, 413)
    assert c.get("/v1/models", headers=headers).status_code == 200


def test_a_ten_megabyte_body_is_refused(client):
    c, headers = client
    body = b'{"model": "base", "messages": [{"role": "user", "content": "' + b"z" * 10_000_000 + b'"}]}'
    assert_openai_error(c.post("/v1/chat/completions", content=body, headers=headers), 413)


def test_too_many_messages_is_400(client):
    c, headers = client
    body = chat_body(messages=[{"role": "user", "content": "hi"}] * 9)
    error = assert_openai_error(c.post("/v1/chat/completions", json=body, headers=headers), 400)
    assert error["param"] == "messages" and "8" in error["message"]


def test_a_long_model_name_is_400(client):
    c, headers = client
    error = assert_openai_error(c.post("/v1/chat/completions", json=chat_body(model="m" * 65), headers=headers), 400)
    assert error["param"] == "model"


def test_a_long_user_header_is_400(client):
    c, headers = client
    response = c.post("/v1/chat/completions", json=chat_body(), headers=headers | {"X-TuneGate-User": "u" * 33})
    assert assert_openai_error(response, 400)["param"] == "X-TuneGate-User"
    ok = c.post("/v1/chat/completions", json=chat_body(), headers=headers | {"X-TuneGate-User": "u" * 32})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("extra", "status", "param"),
    [
        ({"context": "word " * 1000}, 413, "context"),  # 5000 characters > 4000
        ({"documents": ["a" * 3000, {"text": "b" * 3000}]}, 413, "documents"),  # all of them counts
        ({"context": "Short one. " * 21}, 400, "context"),  # 21 sentences > 20
        ({"documents": ["d"] * 5}, 400, "documents"),  # 5 documents > 4
        ({"documents": [1, 2]}, 400, "documents"),  # not text: was a 500
        ({"documents": [{"text": {"nested": 1}}]}, 400, "documents"),
        ({"context": {"text": "a mapping"}}, 400, "context"),
    ],
)
def test_grounding_text_has_caps_and_a_type(client, extra, status, param):
    c, headers = client
    error = assert_openai_error(c.post("/v1/chat/completions", json=chat_body(**extra), headers=headers), status)
    assert error["param"] == param


def test_grounding_within_the_caps_is_served(client):
    c, headers = client
    body = chat_body(documents=["T896 is in Leeds.", {"text": "It ships today."}])
    assert c.post("/v1/chat/completions", json=body, headers=headers).status_code == 200


# --- hostile payloads ---------------------------------------------------------------------------

DEEP = b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "extra": ' + b"[" * 30_000 + b"]" * 30_000
HOSTILE: dict[str, bytes] = {
    "deep nesting (30 000 arrays)": DEEP + b"}",
    "deep nesting (objects)": b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "x": '
    + b'{"a":' * 5000
    + b"1"
    + b"}" * 5001,
    "deep nesting in content parts": json.dumps(
        chat_body(messages=[{"role": "user", "content": [{"type": "text", "x": json.loads("[" * 40 + "]" * 40)}]}])
    ).encode(),
    "huge integer max_tokens": json.dumps(chat_body(max_tokens=10**300)).encode(),
    "5000-digit integer": b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "seed": '
    + b"9" * 5000
    + b"}",
    "1e400 temperature": b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": 1e400}',
    "huge n": json.dumps(chat_body(n=2**63)).encode(),
    "negative max_tokens": json.dumps(chat_body(max_tokens=-1)).encode(),
    "non-UTF-8 bytes": b'{"model": "base", "messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}',
    "UTF-16 body": json.dumps(chat_body()).encode("utf-16"),
    "lone surrogate in content": b'{"model": "base", "messages": [{"role": "user", "content": "\\ud800"}]}',
    "lone surrogate in model": b'{"model": "\\udfff", "messages": [{"role": "user", "content": "x"}]}',
    "lone surrogate in an extra field": b'{"model": "base", "messages": [{"role": "user", "content": "x"}], '
    b'"top_k_extra": "\\ud800"}',
    "lone surrogate as a key": b'{"model": "base", "messages": [{"role": "user", "content": "x", "\\ud800": 1}]}',
    "lone surrogate in context": b'{"model": "base", "messages": [{"role": "user", "content": "x"}], '
    b'"context": "ok \\ud800"}',
    "NUL in content": json.dumps(chat_body(messages=[{"role": "user", "content": "a\x00b"}])).encode(),
    "NUL in model": json.dumps(chat_body(model="ba\x00se")).encode(),
    "NaN temperature": b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    "Infinity max_tokens": b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": Infinity}',
    "NaN in an extra field": b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "top_k": NaN}',
    "-Infinity in content parts": b'{"model": "base", "messages": [{"role": "user", "content": [{"x": -Infinity}]}]}',
    "very long string content": json.dumps(chat_body(messages=[{"role": "user", "content": "w" * 60_000}])).encode(),
    "very long extra key": json.dumps(chat_body(**{"k" * 60_000: 1})).encode(),
    "very long stop": json.dumps(chat_body(stop=["s" * 30_000])).encode(),
    "truncated JSON": b'{"model": "base", "messages": [{"role": ',
    "not JSON": b"model=base&messages=hi",
    "JSON array": b"[1, 2, 3]",
    "JSON null": b"null",
    "JSON string": b'"hello"',
    "empty body": b"",
    "messages is a string": json.dumps({"model": "base", "messages": "hi"}).encode(),
    "message role unknown": json.dumps({"model": "base", "messages": [{"role": "root", "content": "x"}]}).encode(),
    "content is a number": json.dumps({"model": "base", "messages": [{"role": "user", "content": 5}]}).encode(),
    "stream is a string": json.dumps(chat_body(stream="yes")).encode(),
    "stream_options is a list": json.dumps(chat_body(stream=True, stream_options=[1])).encode(),
    "model is a list": json.dumps(chat_body(model=["base"])).encode(),
    "duplicate keys": b'{"model": "base", "model": "base", "messages": [{"role": "user", "content": "x"}]}',
}


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_hostile_payloads_never_5xx_and_errors_are_openai_shaped(client, name, path):
    c, headers = client
    payload = HOSTILE[name]
    if path == "/v1/completions":  # the same payload as a text completion: a prompt, and `messages` an extra field
        payload = payload.replace(b'"messages": ', b'"prompt": "x", "messages": ', 1)
    response = c.post(path, content=payload, headers=headers | {"Content-Type": "application/json"})
    assert response.status_code < 500, (name, response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert_openai_error(response)


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer " + "k" * 8000},
        {"Authorization": "Bearer \x00\x01"},
        {"Authorization": "Basic abc"},
        {"X-API-Key": b"\xe9" * 100},
        {"Content-Type": "text/plain"},
        {"Content-Length": "-1"},
        {"Content-Length": "nonsense"},
    ],
)
def test_hostile_headers_are_refused_in_shape(client, headers):
    c, key = client
    base = key if "Authorization" not in headers and "X-API-Key" not in headers else {}
    response = c.post("/v1/chat/completions", content=json.dumps(chat_body()).encode(), headers=base | headers)
    assert response.status_code < 500, response.text[:300]
    if response.status_code >= 400:
        assert_openai_error(response)


@pytest.mark.parametrize(
    ("declared", "status"), [(b"9" * 5000, 413), (b"70000", 413), (b"abc", 400), (b"-1", 400), (b"", 400)]
)
def test_content_length_is_judged_before_the_app_runs(declared, status):
    """At the ASGI level (a server may let odd values through): never a 5xx, never the app."""

    async def app(scope, receive, send):
        raise AssertionError("the app must not run")

    async def run() -> list[dict]:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", declared)]}
        await BodyLimit(app, 65536)(scope, receive, send)
        return sent

    sent = asyncio.run(run())
    assert sent[0]["status"] == status
    assert set(json.loads(sent[1]["body"])["error"]) == ERROR_KEYS
