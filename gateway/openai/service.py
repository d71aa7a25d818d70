"""Serving one OpenAI request, one way through: limits, route, plan, vLLM, verdict, answer, record.

`CompletionService.complete()` is the whole path of a request after authentication, in order:
  1. the key's rate limits;
  2. the route: alias -> adapter version (sticky canary split), loaded into vLLM if needed and held
     until the answer is over (never unloaded under the request); an adapter vLLM no longer has (404
     after a restart) is loaded again and the request retried once, streams included;
  3. the guard's plan (`GuardService.plan`): logprobs? extra samples? buffer the stream? sample the
     answer for review?
  4. vLLM, with the served adapter name in `model` (the client only ever sees its alias), asked for
     what the plan needs;
  5. the guard's verdict (`GuardService.verdict`) on every answer the client gets (each of `n`
     choices, for each prompt of a list): a calibrated risk and the route's policy -> allow / annotate
     / hold / block, the worst deciding for the whole response, and whether the answer goes to review
     (held or sampled); such an answer is stored with its review item before the client hears back, a
     held one answered with a 202 (recorded as held only once its review item is committed);
  6. the answer: JSON; server-sent events passed through as they come (the plan does not buffer), or
     buffered, judged, then replayed; every event framed by `gateway.upstream.sse`. vLLM's answers are
     checked (`gateway.openai.answers`): a malformed one is a 502, and a stream that fails after its
     first byte ends with an error event and `[DONE]`;
  7. the recorder: the request's row (traffic log, unless stored with its review item) and metrics.
A client that disconnects cancels its upstream request (status 499 in the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from core.keys import Principal
from core.vocab import Decision, ReviewReason
from gateway.deps import RateLimiter
from gateway.errors import GatewayError, UpstreamError, error_body
from gateway.guarding import CONTEXT_FIELDS, GuardService, Plan, request_context, worst
from gateway.openai.answers import Collected, Unit, check_answer, check_chunk
from gateway.openai.schemas import ChatCompletionRequest, CompletionRequest
from gateway.recorder import Exchange, Recorder
from gateway.routing import AdapterManager, Router
from gateway.upstream import DONE, Upstream, sse

CLIENT_CLOSED = 499  # nginx's code for "the client closed the connection first"
REFUSAL = "This answer was withheld by the guardrails."
NOT_STORED = "The answer needs a human review and could not be stored for it; it is not released. Try again shortly."
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
T = TypeVar("T")
log = logging.getLogger("tunegate.gateway")


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
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


class StreamEnd:
    """The end of a live stream, once: close vLLM's stream (which aborts the generation there), release
    the adapter, record the exchange. Run by the relay when it ends, and by `LiveStream` in any case
    (`cut`): the server may stop a response whose client left without ever finishing its body (or
    before starting it), and then the relay does not end by itself."""

    def __init__(self, service: CompletionService, ex: Exchange, events: AsyncIterator, gone: asyncio.Future):
        self.service, self.ex, self.events, self.gone = service, ex, events, gone
        self.ended = False

    async def __call__(self, cut: bool = False) -> None:
        if self.ended:
            return
        self.ended = True
        if cut and self.ex.status == 200:
            self.ex.status, self.ex.error = CLIENT_CLOSED, "client disconnected"
        self.gone.cancel()
        try:
            with anyio.CancelScope(shield=True):  # also when the server is cancelling this request
                await self.events.aclose()
        finally:
            self.service.adapters.release(self.ex.target)
            with anyio.CancelScope(shield=True):
                await self.service._finish(self.ex)


class LiveStream(StreamingResponse):
    """A streamed answer whose `end` runs however the response ends, even if its body never started."""

    def __init__(self, content: AsyncIterator[bytes], end: StreamEnd, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.end = end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.end(cut=True)


class CompletionService:
    """The request path of `/v1/chat/completions` and `/v1/completions`; holds only what it uses."""

    def __init__(
        self,
        limiter: RateLimiter,
        router: Router,
        adapters: AdapterManager,
        upstream: Upstream,
        guard: GuardService,
        recorder: Recorder,
    ) -> None:
        self.limiter, self.router, self.adapters = limiter, router, adapters
        self.upstream, self.guard, self.recorder = upstream, guard, recorder

    async def complete(
        self,
        endpoint: str,
        body: ChatCompletionRequest | CompletionRequest,
        caller: Principal,
        request: Request,
        user_header: str | None,
    ) -> Response:
        ex = Exchange(endpoint, body, caller, body.user or user_header or f"key:{caller.key_id}")
        ex.context = request_context(body.model_extra or {})
        self.recorder.begin()
        streaming = acquired = False
        try:
            await self.limiter.acquire(caller.key_id, *self.limiter.limits(caller))
            ex.target = await self.router.resolve(body.model, ex.end_user)
            await self.adapters.acquire(ex.target)
            acquired = True
            plan = self.guard.plan(ex.target.route, sampling=(body.temperature or 0) > 0)
            payload = self._payload(ex, plan)
            if not body.stream:
                return await self._whole(ex, plan, payload, request)
            # Always ask vLLM for usage so the log and token limits have it; the client sees the
            # usage chunk only if it asked for it.
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
            # Errors before a byte is sent are answered with their real statuses.
            events, first = await self._ask(ex, request, lambda: self._open_stream(PATHS[endpoint], payload))
            if plan.buffer:
                return await self._buffered(ex, plan, first, events, request)
            streaming = True
            gone = asyncio.ensure_future(_wait_for_disconnect(request))
            end = StreamEnd(self, ex, events, gone)
            return LiveStream(
                self._relay(ex, plan, first, events, gone, end),
                end,
                media_type="text/event-stream",
                headers={"X-Request-Id": ex.id, "Cache-Control": "no-cache"},
            )
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
                if acquired:
                    self.adapters.release(ex.target)
                with anyio.CancelScope(shield=True):  # the row is journalled before the answer leaves
                    await self._finish(ex)

    # --- asking vLLM ------------------------------------------------------------------------------

    def _payload(self, ex: Exchange, plan: Plan) -> dict:
        """The body for vLLM: the client's, for the served adapter, plus what the plan needs."""
        body = ex.body
        payload = body.model_dump(exclude_unset=True)
        for name in CONTEXT_FIELDS:
            payload.pop(name, None)
        payload["model"] = ex.target.served_name
        if plan.logprobs and not body.logprobs:
            payload["logprobs"] = True if ex.endpoint == "chat" else 1
        if plan.samples:
            payload["n"] = body.n + plan.samples
        return payload

    async def _from_upstream(self, ex: Exchange, request: Request, work: Awaitable[T]) -> T:
        """`work` against vLLM, timed into the exchange, cancelled if the client leaves."""
        t0 = time.perf_counter()
        try:
            return await _unless_disconnected(request, work)
        finally:
            ex.upstream_s += time.perf_counter() - t0

    async def _ask(self, ex: Exchange, request: Request, work: Callable[[], Awaitable[T]]) -> T:
        """`work()` against vLLM; if vLLM no longer has the adapter (another gateway replica unloaded it,
        or vLLM restarted: a 404), load it again and retry once."""
        try:
            return await self._from_upstream(ex, request, work())
        except UpstreamError as err:
            if err.status_code != 404 or ex.target.path is None:
                raise
            self.adapters.forget(ex.target)
            await self.adapters.ensure(ex.target)
            return await self._from_upstream(ex, request, work())

    async def _open_stream(self, path: str, payload: dict) -> tuple[AsyncIterator[dict | str], dict | str | None]:
        """vLLM's stream and its first event (its errors are raised here, before the client hears back)."""
        events = self.upstream.stream_events(path, payload)
        try:
            return events, await anext(events, None)
        except BaseException:
            await events.aclose()
            raise

    def _collected(self, ex: Exchange, plan: Plan) -> Collected:
        """vLLM answers `n` + the plan's samples choices per prompt; the client gets the first `n` of each."""
        body = ex.body
        prompts = len(body.prompt) if isinstance(getattr(body, "prompt", None), list) else 1
        return Collected(ex.endpoint, body.n, body.n + plan.samples, prompts)

    def _questions(self, ex: Exchange) -> list[str]:
        """What each prompt's answers are checked against (a completion request may send a list)."""
        prompt = getattr(ex.body, "prompt", None)
        return list(prompt) if isinstance(prompt, list) else [ex.body.question()]

    async def _whole(self, ex: Exchange, plan: Plan, payload: dict, request: Request) -> Response:
        """A JSON answer: the client's choices, judged; refused in place when blocked."""
        path = PATHS[ex.endpoint]
        response = await self._ask(ex, request, lambda: self.upstream.post_json(path, payload))
        check_answer(response, ex.endpoint)
        response["model"] = ex.body.model
        collected = self._collected(ex, plan)
        response["choices"] = [c for c in response.get("choices") or [] if collected.take(c)]
        if not ex.body.logprobs:
            for choice in response["choices"]:
                choice["logprobs"] = None
        ex.response, ex.usage = response, response.get("usage")
        held = await self._judge(ex, plan, collected)
        if held is not None:
            return held
        a = ex.assessment
        if a is not None and a.decision in (Decision.ANNOTATE, Decision.BLOCK):
            response["tunegate"] = a.public()
        if a is not None and a.decision == Decision.BLOCK:  # OpenAI's way: content_filter
            for choice in response["choices"]:
                if ex.endpoint == "chat":
                    choice["message"] = {"role": "assistant", "content": REFUSAL}
                else:
                    choice["text"] = REFUSAL
                choice["finish_reason"] = "content_filter"
        return JSONResponse(response, headers={"X-Request-Id": ex.id})

    # --- the guard's verdict ----------------------------------------------------------------------

    async def _judge(self, ex: Exchange, plan: Plan, collected: Collected) -> JSONResponse | None:
        """Ask the guard for its verdict on every answer the client gets; the worst decides. Store an
        answer it sends to review with its review item; return the 202 of a held answer (None: answer
        the client)."""
        checks = collected.checks(self._questions(ex), ex.context)
        verdicts = await asyncio.gather(*(self.guard.verdict(ex.target.route, plan, check) for _, check in checks))
        decisive = worst(verdicts)
        unit = checks[decisive or 0][0]
        ex.answer = unit.text  # the answer the log (and a reviewer) sees: the one that decided
        if decisive is None:
            return None
        a = ex.assessment = verdicts[decisive]
        ex.context = a.context
        if a.review is not None:
            await self._store_for_review(ex, unit, a.review)
        if a.review != ReviewReason.HELD or ex.review_id is None:
            return None
        return JSONResponse(
            {
                "id": ex.review_id,
                "object": "review",
                "status": ReviewReason.HELD,
                "risk": round(a.risk, 4),
                "message": "The answer is waiting for a human reviewer; poll the URL for the outcome.",
                "poll": f"/v1/reviews/{ex.review_id}",
            },
            status_code=202,
            headers={"X-Request-Id": ex.id, "Location": f"/v1/reviews/{ex.review_id}"},
        )

    async def _store_for_review(self, ex: Exchange, unit: Unit, reason: ReviewReason) -> None:
        """The exchange's row with its review item, in one transaction. The exchange says `held` (202)
        only once that is committed: a held answer that cannot be stored is an error, never released;
        a sampled one is answered and logged as usual. A cancelled caller still learns the outcome."""
        view = dataclasses.replace(ex, status=202 if reason == ReviewReason.HELD else ex.status)
        prompt = getattr(ex.body, "prompt", None)
        if isinstance(prompt, list) and len(prompt) > 1:  # the reviewer judges one prompt and its answer
            view.body = ex.body.model_copy(update={"prompt": prompt[unit.prompt]})
        stored = asyncio.ensure_future(self.recorder.hold(view, reason))
        try:
            review_id = await asyncio.shield(stored)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await asyncio.wait({stored})
            if stored.done() and not stored.cancelled() and stored.exception() is None:
                ex.review_id = stored.result()  # committed: the traffic log must not store the row again
            raise
        except GatewayError:  # the recorder's own answer (a held answer it could not store: 503)
            raise
        except Exception as err:
            if reason == ReviewReason.HELD:
                raise GatewayError(NOT_STORED) from err
            log.exception("storing a sampled answer for review failed; it is logged as usual")
            return
        if reason == ReviewReason.HELD and review_id is None:
            raise GatewayError(NOT_STORED)  # fail closed: a held answer is never released unstored
        ex.review_id = review_id
        if reason == ReviewReason.HELD:
            ex.status = 202

    # --- streams ----------------------------------------------------------------------------------

    def _client_event(self, ex: Exchange, chunk: dict, collected: Collected) -> bytes | None:
        """One upstream chunk for the client (None: nothing to send), noting answer, samples, usage."""
        check_chunk(chunk, ex.endpoint)
        chunk["model"] = ex.body.model
        if chunk.get("usage"):
            ex.usage = chunk["usage"]
        chunk["choices"] = [c for c in chunk.get("choices") or [] if collected.take(c)]
        if not ex.body.logprobs:
            for choice in chunk["choices"]:
                choice.pop("logprobs", None)
        wants_usage = bool(ex.body.stream_options and ex.body.stream_options.include_usage)
        if not chunk["choices"] and not (wants_usage and chunk.get("usage")):
            return None
        return sse(chunk)

    def _own_event(self, ex: Exchange, kind: str) -> bytes:
        """A chunk the gateway writes itself: `blocked` (the refusal that replaces a blocked answer) or
        `risk` (no choices; the last chunk of an annotated or blocked stream, carrying `tunegate`)."""
        chunk = {
            "id": f"{kind}-{ex.id}",
            "object": "chat.completion.chunk" if ex.endpoint == "chat" else "text_completion",
            "created": int(time.time()),
            "model": ex.body.model,
            "choices": [],
        }
        if kind == "risk":
            chunk["tunegate"] = ex.assessment.public()
        elif ex.endpoint == "chat":
            delta = {"role": "assistant", "content": REFUSAL}
            chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": "content_filter"}]
        else:
            chunk["choices"] = [{"index": 0, "text": REFUSAL, "finish_reason": "content_filter"}]
        return sse(chunk)

    async def _buffered(
        self, ex: Exchange, plan: Plan, first: dict | str | None, events: AsyncIterator[dict | str], request: Request
    ) -> Response:
        """Routes that can hold or block: read the whole stream, judge it, then replay it or hold it."""
        collected, out = self._collected(ex, plan), []
        event = first
        try:
            while event is not None and event != DONE:
                client_event = self._client_event(ex, event, collected)
                if client_event:
                    out.append(client_event)
                event = await self._from_upstream(ex, request, anext(events, None))
        finally:
            await events.aclose()
        held = await self._judge(ex, plan, collected)
        if held is not None:
            return held
        a = ex.assessment
        if a is not None and a.decision == Decision.BLOCK:
            out = [self._own_event(ex, "blocked")]
        if a is not None and a.decision in (Decision.ANNOTATE, Decision.BLOCK):
            out.append(self._own_event(ex, "risk"))
        out.append(sse(DONE))

        async def replay() -> AsyncIterator[bytes]:
            for chunk in out:
                yield chunk

        return StreamingResponse(replay(), media_type="text/event-stream", headers={"X-Request-Id": ex.id})

    async def _relay(
        self,
        ex: Exchange,
        plan: Plan,
        first: dict | str | None,
        events: AsyncIterator[dict | str],
        gone: asyncio.Future,
        end: StreamEnd,
    ) -> AsyncIterator[bytes]:
        """Pass vLLM's events through as they come, with the alias as `model`; at the end, judge the
        answer and close an annotated stream with its risk event. `gone` completes when the client
        disconnects: then the upstream stream is closed, which aborts the generation in vLLM (the
        server may not tell us by failing a send)."""
        collected = self._collected(ex, plan)
        event = first
        try:
            while event is not None:
                if event == DONE:
                    await self._judge(ex, plan, collected)  # this plan cannot hold: only annotate or sample
                    if ex.assessment is not None and ex.assessment.decision == Decision.ANNOTATE:
                        yield self._own_event(ex, "risk")
                    yield sse(DONE)
                else:
                    client_event = self._client_event(ex, event, collected)
                    if client_event:
                        yield client_event
                if gone.done():
                    raise ClientDisconnected
                t0 = time.perf_counter()
                event = await anext(events, None)
                ex.upstream_s += time.perf_counter() - t0
        except ClientDisconnected:
            ex.status, ex.error = CLIENT_CLOSED, "client disconnected"
        except GatewayError as err:  # mid-stream: the status is sent; say it in an event, then end
            ex.status, ex.error = err.status_code, err.message
            yield sse(error_body(err.message, err.type, code=err.code))
            yield sse(DONE)
        except asyncio.CancelledError:
            ex.status, ex.error = CLIENT_CLOSED, "client disconnected"
            raise
        except Exception as err:  # a bug of ours: still an OpenAI-shaped end of the stream, and logged
            log.exception("a stream failed")
            ex.status, ex.error = 500, f"internal error ({type(err).__name__})"
            yield sse(error_body("The gateway failed in the middle of the answer.", "server_error"))
            yield sse(DONE)
        finally:
            if ex.answer is None:
                ex.answer = collected.text
            await end()

    async def _finish(self, ex: Exchange) -> None:
        """Charge the tokens to the key, and hand the exchange to the recorder (row and metrics)."""
        prompt_tokens, completion_tokens = ex.tokens()
        tokens_per_minute = self.limiter.limits(ex.caller)[1]
        await self.limiter.charge(ex.caller.key_id, tokens_per_minute, (prompt_tokens or 0) + (completion_tokens or 0))
        await self.recorder.finish(ex)
