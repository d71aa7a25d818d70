"""The gateway's connection to vLLM: timeouts, retries on refused connections only, a circuit breaker;
and the server-sent-event wire format, both ways (`stream_events` reads vLLM's, `sse` frames ours).

A request is retried only when the connection itself failed (nothing reached vLLM, nothing was
streamed back), so no generation is ever run twice. After `breaker_failures` consecutive failures
the circuit opens: requests fail fast with a 503 for `breaker_reset_s`, then one probe is let
through; its success closes the circuit. vLLM's own error answers (4xx) are not failures. Whatever a
request raises (a cancellation, an unexpected exception), the breaker hears an outcome, so a half-open
probe is always freed.

vLLM's answers are untrusted input: a body that is not a JSON object, an event that is not one, a
stream that ends without `[DONE]` or a connection cut in the middle of an answer raise
`BadUpstreamAnswer` (502, in OpenAI's error shape, through `gateway.errors`' mapper).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx

from core.settings import GatewaySettings
from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout, UpstreamUnavailable

CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
DONE = "[DONE]"  # the last event of an OpenAI stream


class BadUpstreamAnswer(GatewayError):
    """vLLM answered, but not with what the OpenAI protocol promises (malformed, wrong shape, cut off)."""

    status_code, type, code = 502, "server_error", "bad_upstream_response"

    def __init__(self, what: str) -> None:
        super().__init__(f"vLLM sent an answer the gateway cannot use: {what}")


def sse(data: dict | str) -> bytes:
    """One server-sent event for the client: `data: <JSON>` (or `data: [DONE]`) and a blank line. Every
    event the gateway streams (chunks passed through or replayed, risk, refusal, error, DONE) is framed here."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


class CircuitBreaker:
    def __init__(self, failures_to_open: int, reset_s: float) -> None:
        self.failures_to_open, self.reset_s = failures_to_open, reset_s
        self.failures = 0
        self.opened_at: float | None = None
        self._probe_in_flight = False

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def before_request(self) -> None:
        if self.opened_at is None:
            return
        if time.monotonic() - self.opened_at < self.reset_s or self._probe_in_flight:
            wait = max(0.0, self.reset_s - (time.monotonic() - self.opened_at))
            raise UpstreamUnavailable(
                f"vLLM is unavailable: {self.failures} requests in a row failed; the gateway is failing fast "
                f"and will try again in {wait:.0f} s"
            )
        self._probe_in_flight = True  # half-open: this request is the probe

    def success(self) -> None:
        self.failures, self.opened_at, self._probe_in_flight = 0, None, False

    def abandon(self) -> None:
        """The request was cancelled before an outcome: let the next one probe."""
        self._probe_in_flight = False

    def failure(self) -> None:
        self.failures += 1
        self._probe_in_flight = False
        if self.failures >= self.failures_to_open:
            self.opened_at = time.monotonic()


def _upstream_error(resp: httpx.Response, body: bytes) -> UpstreamError:
    """vLLM's error answer, its status passed through: `{"error": {...}}` (newer vLLM) or the error's
    fields at the top level (older); any other body is quoted. Only text reaches the client."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    err = document.get("error", document) if isinstance(document, dict) else None
    if not isinstance(err, dict):
        text = err if isinstance(err, str) else body.decode(errors="replace")
        return UpstreamError(resp.status_code, text[:500] or "vLLM error")
    message, type_, param = err.get("message"), err.get("type"), err.get("param")
    return UpstreamError(
        resp.status_code,
        message[:2000] if isinstance(message, str) and message else "vLLM error",
        type_ if isinstance(type_, str) and type_ else "invalid_request_error",
        param if isinstance(param, str) else None,
    )


class Upstream:
    """One vLLM OpenAI server, shared by every request of a gateway process."""

    def __init__(self, base_url: str, settings: GatewaySettings, transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.settings = settings
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s)
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(settings.upstream_timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(max_connections=2000, max_keepalive_connections=500),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def _unavailable(self, err: Exception) -> UpstreamUnavailable:
        return UpstreamUnavailable(f"vLLM at {self.base_url} is unavailable ({type(err).__name__}); try again shortly")

    async def _send(self, method: str, path: str, body: dict | None, stream: bool) -> httpx.Response:
        self.breaker.before_request()
        settled = False  # the breaker heard this request's outcome
        try:
            resp = await self._attempts(method, path, body, stream)
            settled = True
            return resp
        except GatewayError:
            settled = True  # `_attempts` told the breaker before raising
            raise
        except Exception:
            self.breaker.failure()  # an unexpected error is a failed request, and frees the probe
            settled = True
            raise
        finally:
            if not settled:  # cancelled (or a BaseException): no outcome; let the next request probe
                self.breaker.abandon()

    async def _attempts(self, method: str, path: str, body: dict | None, stream: bool) -> httpx.Response:
        """Send, retrying refused connections; every way out that is a GatewayError told the breaker."""
        request = self.client.build_request(method, path, json=body)
        for attempt in range(self.settings.connect_retries + 1):
            try:
                resp = await self.client.send(request, stream=stream)
            except CONNECT_ERRORS as err:  # nothing reached vLLM: safe to retry
                if attempt < self.settings.connect_retries:
                    await asyncio.sleep(0.05 * 2**attempt)
                    continue
                self.breaker.failure()
                raise self._unavailable(err) from err
            except httpx.TimeoutException as err:
                self.breaker.failure()
                raise UpstreamTimeout(f"vLLM did not answer within {self.settings.upstream_timeout_s:.0f} s") from err
            except httpx.RemoteProtocolError as err:  # vLLM closed the connection instead of answering
                self.breaker.failure()
                raise BadUpstreamAnswer(f"the connection closed before an answer ({err})") from err
            except httpx.TransportError as err:
                self.breaker.failure()
                raise self._unavailable(err) from err
            if resp.status_code >= 500:
                self.breaker.failure()
                try:
                    body_bytes = await resp.aread()
                except httpx.HTTPError:
                    body_bytes = b""
                finally:
                    await resp.aclose()
                raise _upstream_error(resp, body_bytes)
            self.breaker.success()
            return resp
        raise AssertionError("unreachable")

    async def post(self, path: str, body: dict) -> httpx.Response:
        """POST through the breaker and the connect retries; vLLM's answer as it is, unless a 5xx (raised)."""
        return await self._send("POST", path, body, stream=False)

    async def post_json(self, path: str, body: dict) -> dict:
        """vLLM's JSON object; its error answers raised as `UpstreamError`, anything else as `BadUpstreamAnswer`."""
        resp = await self.post(path, body)
        if resp.status_code >= 400:
            raise _upstream_error(resp, resp.content)
        try:
            answer = resp.json()
        except ValueError as err:  # not JSON (or not UTF-8), e.g. a body cut short
            raise BadUpstreamAnswer("the body is not JSON") from err
        if not isinstance(answer, dict):
            raise BadUpstreamAnswer("the body is not a JSON object")
        return answer

    async def stream_events(self, path: str, body: dict) -> AsyncIterator[dict | str]:
        """vLLM's server-sent events, parsed: each chunk as a dict, then `DONE`; an event that is not a JSON
        object, or a stream cut off before `DONE`, raises `BadUpstreamAnswer`.
        Closing the iterator closes the connection, which makes vLLM abort the generation (a client
        that disconnects cancels its upstream request)."""
        resp = await self._send("POST", path, body, stream=True)
        try:
            if resp.status_code >= 400:
                raise _upstream_error(resp, await resp.aread())
            try:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == DONE:
                        yield DONE
                        return  # anything after the end is not read
                    try:
                        event = json.loads(data)
                    except ValueError as err:
                        raise BadUpstreamAnswer("an event that is not JSON") from err
                    if not isinstance(event, dict):
                        raise BadUpstreamAnswer("an event that is not a JSON object")
                    yield event
            except httpx.TimeoutException as err:
                raise UpstreamTimeout("vLLM stopped sending in the middle of a stream") from err
            except httpx.TransportError as err:  # the connection was cut in the middle of the answer
                raise BadUpstreamAnswer(f"the stream was cut off ({type(err).__name__})") from err
            raise BadUpstreamAnswer("the stream ended without [DONE]")
        finally:
            await resp.aclose()

    async def ready(self) -> bool:
        try:
            resp = await self.client.get("/v1/models", timeout=2.0)
            return resp.status_code == 200
        except httpx.HTTPError:
            return False
