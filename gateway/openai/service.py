"""Serving one OpenAI request: limits, routing, the adapter, vLLM, guardrails, review, the log.

`complete()` is the whole path of a request after authentication, in order:
  1. the key's rate limits;
  2. the route: alias -> adapter version (sticky canary split), loaded into vLLM if needed;
  3. vLLM, with the served adapter name in `model` (the client only ever sees its alias), asked
     for logprobs (and extra samples) when the guardrails need them;
  4. the guardrails: a calibrated risk, and the route's policy -> allow / annotate / hold / block;
  5. the answer back to the client: JSON, server-sent events passed through as they come (routes
     that can only allow or annotate), or buffered first (routes that can hold or block); a held
     answer is a 202 with a review id, stored with its review item before the client hears back;
  6. a traffic-log row and the metrics, recorded without waiting for the database.
A client that disconnects cancels its upstream request (status 499 in the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from core.db import utcnow
from core.keys import Principal
from gateway.deps import Services
from gateway.errors import GatewayError, UpstreamError, error_body
from gateway.guarding import Assessment, request_context
from gateway.openai.schemas import ChatCompletionRequest, CompletionRequest
from gateway.routing import Target
from guardrails.types import CheckInput

CLIENT_CLOSED = 499  # nginx's code for "the client closed the connection first"
EXTENSION_FIELDS = ("context", "documents")  # tunegate's request fields; never forwarded to vLLM
REFUSAL = "This answer was withheld by the guardrails."


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
    context: str | None = None
    assessment: Assessment | None = None
    review_id: str | None = None  # set when the row went to the database with a review item


@dataclass
class Collected:
    """An answer as the guardrails see it: text, token logprobs, extra samples."""

    text: str = ""
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work):
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
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work  # let it unwind (e.g. out of a stream generator) before anyone closes what it used
    raise ClientDisconnected


def _choice_text(endpoint: str, choice: dict) -> str:
    if endpoint == "chat":
        return (choice.get("message") or choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def _add_logprobs(endpoint: str, choice: dict, into: Collected) -> None:
    logprobs = choice.get("logprobs") or {}
    if endpoint == "chat":
        for token in logprobs.get("content") or []:
            into.token_logprobs.append(token["logprob"])
            into.top_logprobs.append({t["token"]: t["logprob"] for t in token.get("top_logprobs") or []})
    else:
        into.token_logprobs.extend(lp for lp in logprobs.get("token_logprobs") or [] if lp is not None)
        into.top_logprobs.extend(t or {} for t in logprobs.get("top_logprobs") or [])


def _question(body: ChatCompletionRequest | CompletionRequest) -> str:
    if isinstance(body, ChatCompletionRequest):
        users = [m.content for m in body.messages if m.role == "user" and isinstance(m.content, str)]
        return users[-1] if users else body.prompt_text()
    return body.prompt_text()


class CompletionService:
    def __init__(self, services: Services) -> None:
        self.s = services

    def _payload(self, ex: Exchange) -> tuple[dict, int]:
        """The body for vLLM, and how many extra samples it asks for (self-consistency)."""
        body, guard = ex.body, self.s.guard
        payload = body.model_dump(exclude_unset=True)
        for name in EXTENSION_FIELDS:
            payload.pop(name, None)
        payload["model"] = ex.target.served_name
        if guard.wants_logprobs() and not body.logprobs:
            payload["logprobs"] = True if ex.endpoint == "chat" else 1
        extra = 0
        gs = self.s.settings.guardrails
        if guard.enabled and "consistency" in gs.detectors and gs.consistency_samples and (body.temperature or 0) > 0:
            extra = gs.consistency_samples  # greedy samples would all agree: only when sampling
            payload["n"] = body.n + extra
        return payload, extra

    def _trim(self, ex: Exchange, response: dict, extra: int) -> Collected:
        """Take what the guardrails need out of vLLM's response, leaving what the client asked for."""
        choices = response.get("choices") or []
        collected = Collected()
        if choices:
            collected.text = _choice_text(ex.endpoint, choices[0])
            _add_logprobs(ex.endpoint, choices[0], collected)
        collected.samples = [_choice_text(ex.endpoint, c) for c in choices[ex.body.n :]]
        if extra:
            response["choices"] = choices[: ex.body.n]
        if not ex.body.logprobs:
            for choice in response.get("choices") or []:
                choice["logprobs"] = None
        return collected

    async def _assess(self, ex: Exchange, collected: Collected) -> None:
        check = CheckInput(
            question=_question(ex.body),
            answer=collected.text,
            context=ex.context,
            token_logprobs=collected.token_logprobs or None,
            top_logprobs=collected.top_logprobs or None,
            samples=collected.samples,
        )
        ex.assessment = await self.s.guard.assess(ex.target.route, check)
        if ex.assessment is not None:
            ex.context = ex.assessment.context

    async def _withhold(self, ex: Exchange) -> JSONResponse | None:
        """Apply a `hold` decision: store the row with its review item, answer 202. Sample allowed
        answers for review too (the client still gets its answer)."""
        a = ex.assessment
        if a is None:
            return None
        if a.decision == "hold":
            ex.status = 202
            ex.review_id = await asyncio.to_thread(
                self.s.review.hold, self._row(ex), reason="held", context=ex.context, scores=a.stored()
            )
            return JSONResponse(
                {
                    "id": ex.review_id,
                    "object": "review",
                    "status": "held",
                    "risk": round(a.risk, 4),
                    "message": "The answer is waiting for a human reviewer; poll the URL for the outcome.",
                    "poll": f"/v1/reviews/{ex.review_id}",
                },
                status_code=202,
                headers={"X-Request-Id": ex.id, "Location": f"/v1/reviews/{ex.review_id}"},
            )
        if a.decision in ("allow", "annotate") and self.s.guard.sample_for_review():
            ex.review_id = await asyncio.to_thread(
                self.s.review.hold, self._row(ex), reason="sampled", context=ex.context, scores=a.stored()
            )
        return None

    def _decorate(self, ex: Exchange, response: dict) -> None:
        """`annotate`: attach the risk; `block`: replace the answer, OpenAI's way (content_filter)."""
        a = ex.assessment
        if a is None:
            return
        if a.decision in ("annotate", "block"):
            response["tunegate"] = a.public()
        if a.decision == "block":
            for choice in response.get("choices") or []:
                if ex.endpoint == "chat":
                    choice["message"] = {"role": "assistant", "content": REFUSAL}
                else:
                    choice["text"] = REFUSAL
                choice["finish_reason"] = "content_filter"

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
        ex.context = request_context(body.model_extra or {})
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
            payload, extra = self._payload(ex)
            path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
            if body.stream:
                # Always ask vLLM for usage so the log and token limits have it; the client sees
                # the usage chunk only if it asked for it.
                payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
                lines = self.s.upstream.stream_lines(path, payload)
                t0 = time.perf_counter()
                first = await _unless_disconnected(request, anext(lines))  # errors before a byte: real statuses
                ex.upstream_s += time.perf_counter() - t0
                if self.s.guard.may_withhold(ex.target.route):
                    return await self._buffered_stream(ex, first, lines, request)
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
            collected = self._trim(ex, response, extra)
            ex.response, ex.usage, ex.answer = response, response.get("usage"), collected.text
            await self._assess(ex, collected)
            held = await self._withhold(ex)
            if held is not None:
                return held
            self._decorate(ex, response)
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

    def _chunk_event(self, ex: Exchange, chunk: dict, collected: Collected, wants_usage: bool) -> bytes | None:
        """One upstream chunk for the client (None: nothing to send), noting answer, logprobs, usage."""
        chunk["model"] = ex.body.model
        if chunk.get("usage"):
            ex.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        for choice in choices:
            if choice.get("index", 0) == 0:
                collected.text += _choice_text(ex.endpoint, choice)
                _add_logprobs(ex.endpoint, choice, collected)
            if not ex.body.logprobs:
                choice.pop("logprobs", None)
        if not choices and not wants_usage:
            return None
        return f"data: {json.dumps(chunk)}\n\n".encode()

    def _risk_event(self, ex: Exchange) -> bytes:
        """The last event of an annotated stream: a chunk with no choices, carrying the risk."""
        chunk = {
            "id": f"risk-{ex.id}",
            "object": "chat.completion.chunk" if ex.endpoint == "chat" else "text_completion",
            "created": int(time.time()),
            "model": ex.body.model,
            "choices": [],
            "tunegate": ex.assessment.public(),
        }
        return f"data: {json.dumps(chunk)}\n\n".encode()

    async def _buffered_stream(self, ex: Exchange, first: str, lines: AsyncIterator[str], request: Request):
        """Routes that can hold or block: read the whole stream, judge it, then replay it or hold it."""
        wants_usage = bool(ex.body.stream_options and ex.body.stream_options.include_usage)
        collected, events = Collected(), []
        line: str | None = first
        try:
            while line is not None:
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    event = self._chunk_event(ex, json.loads(line[5:].strip()), collected, wants_usage)
                    if event:
                        events.append(event)
                t0 = time.perf_counter()
                line = await _unless_disconnected(request, anext(lines, None))
                ex.upstream_s += time.perf_counter() - t0
        finally:
            await lines.aclose()
        ex.answer = collected.text
        await self._assess(ex, collected)
        held = await self._withhold(ex)
        if held is not None:
            return held
        if ex.assessment is not None and ex.assessment.decision == "block":
            blocked = {
                "id": f"blocked-{ex.id}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": ex.body.model,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": REFUSAL}, "finish_reason": "content_filter"}
                ],
            }
            events = [f"data: {json.dumps(blocked)}\n\n".encode()]
        if ex.assessment is not None and ex.assessment.decision in ("annotate", "block"):
            events.append(self._risk_event(ex))
        events.append(b"data: [DONE]\n\n")

        async def replay() -> AsyncIterator[bytes]:
            for event in events:
                yield event

        return StreamingResponse(replay(), media_type="text/event-stream", headers={"X-Request-Id": ex.id})

    async def _relay(
        self, ex: Exchange, first: str, lines: AsyncIterator[str], gone: asyncio.Future
    ) -> AsyncIterator[bytes]:
        """Pass vLLM's events through as they come, with the alias as `model`; collect the answer,
        then (guardrails on) end an annotated stream with its risk event. `gone` completes when the
        client disconnects: then the upstream stream is closed, which aborts the generation in vLLM
        (the server may not tell us by failing a send)."""
        wants_usage = bool(ex.body.stream_options and ex.body.stream_options.include_usage)
        collected = Collected()
        line: str | None = first
        try:
            while line is not None:
                if line.startswith("data:"):
                    data = line[5:].strip()
                    if data == "[DONE]":
                        ex.answer = collected.text
                        await self._assess(ex, collected)
                        if ex.assessment is not None and ex.assessment.decision == "annotate":
                            yield self._risk_event(ex)
                        yield b"data: [DONE]\n\n"
                    else:
                        event = self._chunk_event(ex, json.loads(data), collected, wants_usage)
                        if event:
                            yield event
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
            ex.answer = collected.text
            self._finish(ex)

    def _row(self, ex: Exchange) -> dict:
        """The traffic-log row of this exchange (`requests` table)."""
        total_s = time.perf_counter() - ex.started
        target, a = ex.target, ex.assessment
        usage = ex.usage or {}
        return {
            "id": ex.id,
            "created_at": ex.created_at,
            "api_key_id": ex.caller.key_id,
            "end_user": ex.end_user,
            "route": ex.body.model if target is None else target.route,
            "adapter_id": target.adapter_id if target else None,
            "endpoint": ex.endpoint,
            "stream": ex.body.stream,
            "status_code": ex.status,
            "request_json": ex.body.model_dump(exclude_unset=True),
            "response_json": ex.response,
            "prompt_text": ex.body.prompt_text(),
            "answer_text": ex.answer,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "latency_ms": total_s * 1000,
            "upstream_latency_ms": ex.upstream_s * 1000 if ex.upstream_s else None,
            "guardrail_ms": a.seconds * 1000 if a else None,
            "risk": a.risk if a else None,
            "decision": (a.decision if a else "allow") if ex.status in (200, 202) else None,
            "guardrail_scores": a.stored() if a else None,
            "error": ex.error,
        }

    def _finish(self, ex: Exchange) -> None:
        total_s = time.perf_counter() - ex.started
        metrics, target, a = self.s.metrics, ex.target, ex.assessment
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
        if a is not None:
            metrics.guardrail_seconds.labels(route=route).observe(a.seconds)
        if ex.status in (200, 202):
            metrics.decisions.labels(route=route, decision=a.decision if a else "allow").inc()
        if prompt_tokens:
            metrics.tokens.labels(route=route, kind="prompt").inc(prompt_tokens)
        if completion_tokens:
            metrics.tokens.labels(route=route, kind="completion").inc(completion_tokens)
        limit = ex.caller.tokens_per_minute or self.s.settings.gateway.tokens_per_minute
        self.s.limiter.spend_tokens(ex.caller.key_id, limit, (prompt_tokens or 0) + (completion_tokens or 0))
        if ex.review_id is None:  # held and sampled rows were stored with their review item
            self.s.traffic.record(self._row(ex))
