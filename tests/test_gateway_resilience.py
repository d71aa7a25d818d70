"""Fault injection: vLLM down (503, then recovery), the circuit breaker, a client that disconnects.

The upstream here is a stand-in OpenAI server whose faults the test controls; everything else (the
gateway, its database, its keys) is real.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from core.db import Request as LoggedRequest
from core.db import make_engine, session_factory, session_scope, upgrade
from core.io import free_port
from core.keys import create_key
from core.settings import load_settings
from gateway.app import create_app

from .conftest import ServerThread

CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def fake_vllm(events: list[str]) -> FastAPI:
    """An OpenAI server that answers 'ok', slowly when asked to, and notes when a client hung up."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "base", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        slow = body["messages"][0]["content"] == "slow"
        if body.get("stream"):

            async def gen():
                for i in range(50 if slow else 1):
                    events.append("chunk")  # progress: stops growing when the stream is cut
                    chunk = {
                        "id": "x",
                        "object": "chat.completion.chunk",
                        "model": body["model"],
                        "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(0.1)
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")
        for _ in range(50 if slow else 0):
            if await request.is_disconnected():
                events.append("disconnected")
                return {}
            await asyncio.sleep(0.1)
        return {
            "id": "x",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }

    return app


@pytest.fixture(params=["live", "buffered"])
def gateway(tmp_path, request):
    """A gateway whose answers stream live (guardrails off) or are buffered (a route that can hold)."""
    port = free_port()
    guardrails = {"enabled": False} if request.param == "live" else {"policy": {"hold_at": 1.0, "block_at": 1.0}}
    settings = load_settings(
        None,
        var_dir=tmp_path,
        vllm={"url": f"http://127.0.0.1:{port}"},
        guardrails=guardrails,
        gateway={"breaker_failures": 2, "breaker_reset_s": 0.5, "connect_retries": 1, "log_flush_interval_s": 0.05},
    )
    upgrade(settings.database_url)
    with session_scope(session_factory(make_engine(settings.database_url))) as session:
        key = create_key(session, "app", "app")[0]
    with ServerThread(create_app(settings)) as server:
        yield {
            "url": server.url,
            "headers": {"Authorization": f"Bearer {key}"},
            "vllm_port": port,
            "settings": settings,
        }


def post(gw, body=CHAT, timeout=10.0):
    return httpx.post(gw["url"] + "/v1/chat/completions", json=body, headers=gw["headers"], timeout=timeout)


def test_vllm_down_is_a_clear_503_then_the_breaker_fails_fast_then_recovery(gateway):
    first = post(gateway)
    assert first.status_code == 503
    assert first.json()["error"]["code"] == "upstream_unavailable" and "unavailable" in first.json()["error"]["message"]
    assert post(gateway).status_code == 503  # second consecutive failure opens the circuit
    t0 = time.perf_counter()
    fast = post(gateway)
    assert fast.status_code == 503 and "failing fast" in fast.json()["error"]["message"]
    assert time.perf_counter() - t0 < 0.5
    assert "tunegate_upstream_circuit_open 1.0" in httpx.get(gateway["url"] + "/metrics").text
    assert httpx.get(gateway["url"] + "/readyz").status_code == 503

    events: list[str] = []
    vllm = ServerThread(fake_vllm(events))
    vllm.port, vllm.url = gateway["vllm_port"], f"http://127.0.0.1:{gateway['vllm_port']}"
    vllm.server.config.port = gateway["vllm_port"]
    with vllm:
        time.sleep(0.6)  # the breaker's reset time: the next request is the probe
        recovered = post(gateway)
        assert recovered.status_code == 200 and recovered.json()["choices"][0]["message"]["content"] == "ok"
        assert post(gateway).status_code == 200
        assert httpx.get(gateway["url"] + "/readyz").status_code == 200
        assert "tunegate_upstream_circuit_open 0.0" in httpx.get(gateway["url"] + "/metrics").text


@pytest.fixture
def gateway_with_fake(gateway):
    events: list[str] = []
    vllm = ServerThread(fake_vllm(events))
    vllm.port, vllm.url = gateway["vllm_port"], f"http://127.0.0.1:{gateway['vllm_port']}"
    vllm.server.config.port = gateway["vllm_port"]
    with vllm:
        yield gateway, events


def _logged_statuses(settings) -> list[int]:
    with session_factory(make_engine(settings.database_url))() as session:
        return [r.status_code for r in session.scalars(select(LoggedRequest))]


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_cancels_its_upstream_request(gateway_with_fake, stream):
    gw, events = gateway_with_fake
    body = {**CHAT, "messages": [{"role": "user", "content": "slow"}], "stream": stream}
    with pytest.raises(httpx.ReadTimeout):
        if stream:
            with httpx.stream(
                "POST",
                gw["url"] + "/v1/chat/completions",
                json=body,
                headers=gw["headers"],
                timeout=httpx.Timeout(10, read=0.3),
            ) as resp:
                for _ in resp.iter_lines():
                    time.sleep(0.5)  # a slow reader that then gives up
                    raise httpx.ReadTimeout("giving up")
        else:
            post(gw, body, timeout=0.3)
    if stream:  # the upstream stops producing soon after the client left, long before its 50 chunks
        time.sleep(1.0)
        produced = events.count("chunk")
        time.sleep(1.0)
        assert events.count("chunk") == produced < 30
    else:
        deadline = time.monotonic() + 4
        while "disconnected" not in events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "disconnected" in events  # vLLM saw the connection close: the generation was aborted
    deadline = time.monotonic() + 4
    while 499 not in _logged_statuses(gw["settings"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 499 in _logged_statuses(gw["settings"])


def test_a_slow_vllm_is_a_504(tmp_path):
    events: list[str] = []
    with ServerThread(fake_vllm(events)) as vllm:
        settings = load_settings(None, var_dir=tmp_path, vllm={"url": vllm.url}, gateway={"upstream_timeout_s": 0.5})
        upgrade(settings.database_url)
        with session_scope(session_factory(make_engine(settings.database_url))) as session:
            key = create_key(session, "app", "app")[0]
        with ServerThread(create_app(settings)) as gw:
            resp = httpx.post(
                gw.url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={**CHAT, "messages": [{"role": "user", "content": "slow"}]},
                timeout=10,
            )
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "upstream_timeout"
