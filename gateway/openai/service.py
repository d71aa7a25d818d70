"""Serving one OpenAI request: limits, routing, the adapter, vLLM, the traffic log, the metrics.

`complete()` is the whole path of a request after authentication, in order:
  1. the key's rate limits;
  2. the route: alias -> adapter version (sticky canary split), loaded into vLLM if needed;
  3. vLLM, with the served adapter name in `model` (the client only ever sees its alias);
  4. the answer back to the client (JSON, or server-sent events passed through as they come);
  5. a traffic-log row and the metrics, recorded without waiting for the database.
A client that disconnects cancels its upstream request (status 499 in the log).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gateway.deps import Services
from gateway.errors import GatewayError, UpstreamError, error_body
from gateway.openai.schemas import ChatCompletionRequest, CompletionRequest
from gateway.routing import Target
from tunegate.db import utcnow
from tunegate.keys import Principal

CLIENT_CLOSED = 499  # nginx's code for "the client closed the connection first"


class ClientDisconnected(Exception):
    pass


@dataclass
class Exchange:
    """What is known about one request as it goes; becomes the traffic-log row."""

    endpoint: str
    body: ChatCompletionRequest | CompletionRequest
    caller: Principal
    end_user: str
    target: Target | None = None
    started: float = field(default_factory=time.perf_counter)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: object = field(default_factory=utcnow)
    upstream_s: float = 0.0
    status: int = 200
    answer: str | None = None
    response: dict | None = None
    usage: dict | None = None
    error: str | None = None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: asyncio.Future):
    """Run `work`; if the client goes away first, cancel it (closing the connection to vLLM aborts
    the generation there) and raise `ClientDisconnected`."""
    work = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watcher.cancel()
    if work in done:
        return work.result()
    work.cancel()
    raise ClientDisconnected


def _answer_text(endpoint: str, response: dict) -> str | None:
    choices = response.get("choices") or []
    if not choices:
        return None
    first = choices[0]
    return (first.get("message") or {}).get("content") if endpoint == "chat" else first.get("text")


class CompletionService:
    def __init__(self, services: Services) -> None:
        self.s = services

    async def complete(
        self,
        endpoint: str,
        body: ChatCompletionRequest | CompletionRequest,
        caller: Principal,
        request: Request,
        user_header: str | None,
    ):
        gw = self.s.settings.gateway
        ex = Exchange(endpoint, body, caller, body.user or user_header or f"key:{caller.key_id}")
        self.s.metrics.in_flight.inc()
        streaming = False
        try:
            self.s.limiter.admit(
                caller.key_id,
                caller.requests_per_minute or gw.requests_per_minute,
                caller.tokens_per_minute or gw.tokens_per_minute,
            )
            ex.target = await self.s.router.resolve(body.model, ex.end_user)
            await self.s.adapters.ensure(ex.target)
            payload = body.model_dump(exclude_unset=True)
            payload["model"] = ex.target.served_name
            path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
            if body.stream:
                # Always ask vLLM for usage so the log and token limits have it; the client sees
                # the usage chunk only if it asked for it.
                payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
                lines = self.s.upstream.stream_lines(path, payload)
                t0 = time.perf_counter()
                first = await _unless_disconnected(request, anext(lines))  # errors before a byte: real statuses
                ex.upstream_s += time.perf_counter() - t0
                streaming = True
                return StreamingResponse(
                    self._relay(ex, first, lines, asyncio.ensure_future(_wait_for_disconnect(request))),
                    media_type="text/event-stream",
                    headers={"X-Request-Id": ex.id, "Cache-Control": "no-cache"},
                )
            t0 = time.perf_counter()
            try:
                response = await _unless_disconnected(request, self.s.upstream.post_json(path, payload))
            except UpstreamError as err:
                if err.status_code != 404 or ex.target.path is None:
                    raise
                # The adapter is gone from vLLM (another gateway replica unloaded it, or vLLM
                # restarted): load it again and retry once.
                self.s.adapters.forget(ex.target)
                await self.s.adapters.ensure(ex.target)
                response = await _unless_disconnected(request, self.s.upstream.post_json(path, payload))
            ex.upstream_s = time.perf_counter() - t0
            response["model"] = body.model
            ex.response, ex.usage, ex.answer = (
                response,
                response.get("usage"),
                _answer_text(endpoint, response),
            )
            return JSONResponse(response, headers={"X-Request-Id": ex.id})
        except GatewayError as err:
            ex.status, ex.error = err.status_code, err.message
            raise
        except ClientDisconnected:
            ex.status, ex.error = CLIENT_CLOSED, "client disconnected"
            return Response(status_code=CLIENT_CLOSED)  # nobody is listening; this ends the handler cleanly
        except asyncio.CancelledError:
            ex.status, ex.error = CLIENT_CLOSED, "client disconnected"
            raise
        finally:
            if not streaming:
                self._finish(ex)

    async def _relay(
        self, ex: Exchange, first: str, lines: AsyncIterator[str], gone: asyncio.Future
    ) -> AsyncIterator[bytes]:
        """Pass vLLM's events through, with the alias as `model`; collect the answer and usage.
        `gone` completes when the client disconnects: then the upstream stream is closed, which
        aborts the generation in vLLM (the server may not tell us by failing a send)."""
        wants_usage = bool(ex.body.stream_options and ex.body.stream_options.include_usage)
        parts: list[str] = []
        line: str | None = first
        try:
            while line is not None:
                if line.startswith("data:"):
                    data = line[5:].strip()
                    if data == "[DONE]":
                        yield b"data: [DONE]\n\n"
                    else:
                        chunk = json.loads(data)
                        chunk["model"] = ex.body.model
                        if chunk.get("usage"):
                            ex.usage = chunk["usage"]
                        choices = chunk.get("choices") or []
                        for choice in choices:
                            if choice.get("index", 0) == 0:
                                delta = choice.get("delta") or {}
                                parts.append(delta.get("content") or choice.get("text") or "")
                        if choices or wants_usage:
                            yield f"data: {json.dumps(chunk)}\n\n".encode()
                if gone.done():
                    raise ClientDisconnected
                t0 = time.perf_counter()
                line = await anext(lines, None)
                ex.upstream_s += time.perf_counter() - t0
        except ClientDisconnected:
            ex.status, ex.error = CLIENT_CLOSED, "client disconnected"
        except GatewayError as err:  # mid-stream: the status is sent; say it in an event
            ex.status, ex.error = err.status_code, err.message
            yield f"data: {json.dumps(error_body(err.message, err.type, code=err.code))}\n\n".encode()
        except asyncio.CancelledError:
            ex.status, ex.error = CLIENT_CLOSED, "client disconnected"
            raise
        finally:
            gone.cancel()
            await lines.aclose()
            ex.answer = "".join(parts)
            self._finish(ex)

    def _finish(self, ex: Exchange) -> None:
        total_s = time.perf_counter() - ex.started
        metrics, target = self.s.metrics, ex.target
        route = ex.body.model if target is None else target.route
        version = target.adapter_version if target else "none"
        prompt_tokens = (ex.usage or {}).get("prompt_tokens")
        completion_tokens = (ex.usage or {}).get("completion_tokens")
        metrics.in_flight.dec()
        metrics.requests.labels(route=route, adapter_version=version, status=str(ex.status)).inc()
        metrics.request_seconds.labels(route=route).observe(total_s)
        if ex.upstream_s:
            metrics.upstream_seconds.labels(route=route).observe(ex.upstream_s)
            metrics.overhead_seconds.labels(route=route).observe(max(0.0, total_s - ex.upstream_s))
        if ex.status == 200:
            metrics.decisions.labels(route=route, decision="allow").inc()
        if prompt_tokens:
            metrics.tokens.labels(route=route, kind="prompt").inc(prompt_tokens)
        if completion_tokens:
            metrics.tokens.labels(route=route, kind="completion").inc(completion_tokens)
        limit = ex.caller.tokens_per_minute or self.s.settings.gateway.tokens_per_minute
        self.s.limiter.spend_tokens(ex.caller.key_id, limit, (prompt_tokens or 0) + (completion_tokens or 0))
        self.s.traffic.record(
            {
                "id": ex.id,
                "created_at": ex.created_at,
                "api_key_id": ex.caller.key_id,
                "end_user": ex.end_user,
                "route": route,
                "adapter_id": target.adapter_id if target else None,
                "endpoint": ex.endpoint,
                "stream": ex.body.stream,
                "status_code": ex.status,
                "request_json": ex.body.model_dump(exclude_unset=True),
                "response_json": ex.response,
                "prompt_text": ex.body.prompt_text(),
                "answer_text": ex.answer,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "latency_ms": total_s * 1000,
                "upstream_latency_ms": ex.upstream_s * 1000 if ex.upstream_s else None,
                "guardrail_ms": None,
                "risk": None,
                "decision": "allow" if ex.status == 200 else None,
                "guardrail_scores": None,
                "error": ex.error,
            }
        )
