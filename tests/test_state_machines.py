"""Every state machine survives exceptions: the circuit breaker frees its half-open probe whatever the
probe raises; an adapter vLLM lost (a restart) is loaded again on streams too; an adapter a request is
using is never unloaded under it; a held answer is recorded as held only once its review item is stored.

vLLM is an `httpx.MockTransport` (fault injection); the gateway is the one `tests.test_gateway_path`
builds, its completion service given a stub router that names an adapter.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import pytest
from starlette.requests import ClientDisconnect, Request

from core.keys import Principal
from core.settings import GatewaySettings
from core.vocab import Decision, ReviewReason
from gateway.deps import RateLimiter, get_completions
from gateway.errors import UpstreamUnavailable
from gateway.guarding import Plan
from gateway.metrics import Metrics
from gateway.openai.schemas import ChatCompletionRequest
from gateway.openai.service import CompletionService
from gateway.recorder import Recorder
from gateway.routing import AdapterManager, Target
from gateway.upstream import DONE, Upstream
from tests.test_gateway_path import FakeVllm, StubGuard, chat, events, gateway, stored  # noqa: F401 - a fixture

# --- the circuit breaker --------------------------------------------------------------------------


def half_open_upstream(handler, retries: int = 0) -> Upstream:
    """An upstream whose circuit opens after one failure and is half-open at once (no waiting)."""
    settings = GatewaySettings(connect_retries=retries, breaker_failures=1, breaker_reset_s=60)
    upstream = Upstream("http://vllm.test", settings, transport=httpx.MockTransport(handler))
    upstream.breaker.reset_s = 0  # every request after a failure is a probe; no test waits on a clock
    return upstream


def test_a_probe_that_raises_anything_frees_the_half_open_circuit():
    answers = iter([httpx.ConnectError("refused"), RuntimeError("a bug in a transport"), None])

    def vllm(request: httpx.Request) -> httpx.Response:
        answer = next(answers)
        if answer is not None:
            raise answer
        return httpx.Response(200, json={"ok": True})

    async def run():
        upstream = half_open_upstream(vllm)
        with pytest.raises(UpstreamUnavailable):
            await upstream.post("/v1/x", {})
        assert upstream.breaker.is_open
        with pytest.raises(RuntimeError):  # the probe fails in an unexpected way
            await upstream.post("/v1/x", {})
        assert await upstream.post_json("/v1/x", {}) == {"ok": True}  # the next request probes, and closes it
        assert not upstream.breaker.is_open
        await upstream.aclose()

    asyncio.run(run())


def test_a_probe_cancelled_while_it_waits_to_retry_frees_the_half_open_circuit():
    async def run():
        refused = asyncio.Event()
        state = {"up": False}

        async def vllm(request: httpx.Request) -> httpx.Response:
            if state["up"]:
                return httpx.Response(200, json={"ok": True})
            refused.set()
            raise httpx.ConnectError("refused")

        upstream = half_open_upstream(vllm, retries=1)
        with pytest.raises(UpstreamUnavailable):
            await upstream.post("/v1/x", {})
        refused.clear()
        probe = asyncio.create_task(upstream.post("/v1/x", {}))
        await refused.wait()  # the probe was refused once and now waits before its retry
        probe.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await probe
        state["up"] = True
        assert await upstream.post_json("/v1/x", {}) == {"ok": True}
        await upstream.aclose()

    asyncio.run(run())


# --- adapters -------------------------------------------------------------------------------------


class AdapterRouter:
    """Every model name is an adapter `<name>-v1` in `folder` (the registry's database is not needed)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def resolve(self, model: str, user: str) -> Target:
        return Target(model, f"{model}-v1", None, f"{model}/v1", self.folder)


class AdapterVllm(FakeVllm):
    """`FakeVllm` with vLLM's runtime adapter API: which adapters it has, which calls it saw; `forget()`
    is a vLLM restart; a completion of an adapter named in `slow` waits until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.slow: set[str] = set()
        self.entered, self.release = threading.Event(), threading.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        name = body.get("lora_name") or body.get("model")
        self.calls.append((request.url.path.rsplit("/", 1)[-1], name))
        if request.url.path == "/v1/load_lora_adapter":
            self.adapters.add(name)
            return httpx.Response(200, text="ok")
        if request.url.path == "/v1/unload_lora_adapter":
            self.adapters.discard(name)
            return httpx.Response(200, text="ok")
        if name not in self.adapters:
            error = {"message": f"The model `{name}` does not exist.", "type": "NotFoundError", "code": 404}
            return httpx.Response(404, json={"error": error})
        if name in self.slow:
            self.entered.set()
            while not self.release.is_set():  # another request runs meanwhile
                await asyncio.sleep(0.01)
        return super().__call__(request)


@pytest.fixture
def adapters(gateway, tmp_path):  # noqa: F811 - the imported fixture
    """The gateway with a completion service whose every model is an adapter (capacity: one loaded)."""
    client, _, _, sessions = gateway
    real = client.app.state.services.completions
    vllm = AdapterVllm()
    upstream = Upstream("http://vllm.test", real.upstream.settings, transport=httpx.MockTransport(vllm))
    manager = AdapterManager(upstream, capacity=1, metrics=Metrics())

    def use(plan: Plan, decision: Decision = Decision.ALLOW, recorder: Recorder | None = None) -> None:
        stub = CompletionService(
            RateLimiter(),
            AdapterRouter(tmp_path),
            manager,
            upstream,
            StubGuard(plan, decision),
            recorder or real.recorder,
        )
        client.app.dependency_overrides[get_completions] = lambda: stub

    return client, use, vllm, manager, sessions


@pytest.mark.parametrize("plan", [Plan(), Plan(buffer=True)], ids=["live", "buffered"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_an_adapter_vllm_lost_is_loaded_again_and_the_request_retried(adapters, plan, stream):
    client, use, vllm, manager, _ = adapters
    use(plan)
    assert chat(client, model="support").status_code == 200
    vllm.adapters.clear()  # vLLM restarted: it answers 404 for the adapter the gateway thinks is loaded
    resp = chat(client, model="support", stream=stream)
    assert resp.status_code == 200
    if stream:
        assert events(resp)[-1] == DONE
    loads = [call for call in vllm.calls if call[0] == "load_lora_adapter"]
    assert loads == [("load_lora_adapter", "support-v1")] * 2 and "support-v1" in manager.loaded


def test_an_adapter_in_use_is_not_unloaded_under_its_request(adapters):
    client, use, vllm, manager, _ = adapters
    use(Plan())
    vllm.slow.add("first-v1")
    answers: list[httpx.Response] = []
    first = threading.Thread(target=lambda: answers.append(chat(client, model="first")))
    first.start()
    try:
        assert vllm.entered.wait(30)  # `first` is being answered
        assert chat(client, model="second").status_code == 200  # capacity 1: `first` would be evicted
        assert ("unload_lora_adapter", "first-v1") not in vllm.calls
    finally:
        vllm.release.set()
        first.join(30)
    assert answers[0].status_code == 200 and not manager.in_use
    assert chat(client, model="third").status_code == 200  # nothing in use now: back under capacity
    assert {"first-v1", "second-v1"}.isdisjoint(manager.loaded) and list(manager.loaded) == ["third-v1"]


# --- a held answer --------------------------------------------------------------------------------


class BrokenReviewStore(Recorder):
    """The real recorder, except that storing an answer for review fails unexpectedly."""

    async def hold(self, ex, reason: ReviewReason) -> str:
        raise RuntimeError("the review store failed")


def test_a_hold_is_recorded_only_once_its_review_item_is_stored(adapters):
    client, use, _, _, sessions = adapters
    real = client.app.state.services.completions.recorder
    use(Plan(buffer=True), Decision.HOLD, BrokenReviewStore(real.traffic, real.review, real.metrics, real.settings))
    resp = chat(client, model="support")
    assert resp.status_code >= 500 and resp.json()["error"]["message"]  # never released, never a 202
    (row, item), *others = stored(sessions)
    assert not others and item is None
    assert row.status_code == resp.status_code and row.decision is None  # not logged as a 202 `hold`


class CountingRecorder:
    """The recorder's two ends of a request, counted."""

    def __init__(self) -> None:
        self.in_flight, self.finished = 0, []

    def begin(self) -> None:
        self.in_flight += 1

    async def finish(self, ex) -> None:
        self.in_flight -= 1
        self.finished.append(ex)


def test_a_live_stream_whose_client_left_before_the_first_byte_is_still_ended(tmp_path):
    vllm, recorder = AdapterVllm(), CountingRecorder()

    async def run():
        upstream = Upstream("http://vllm.test", GatewaySettings(), transport=httpx.MockTransport(vllm))
        manager = AdapterManager(upstream, capacity=1, metrics=Metrics())
        guard = StubGuard(Plan(), Decision.ALLOW)
        service = CompletionService(RateLimiter(), AdapterRouter(tmp_path), manager, upstream, guard, recorder)
        left = asyncio.Event()

        async def receive() -> dict:
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            raise OSError("the connection is closed")  # how a server tells the app its client is gone

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "asgi": {"spec_version": "2.4"}}
        body = ChatCompletionRequest(model="support", messages=[{"role": "user", "content": "hi"}], stream=True)
        caller = Principal(key_id=1, name="app", role="app", requests_per_minute=None, tokens_per_minute=None)
        response = await service.complete("chat", body, caller, Request(scope, receive), None)
        left.set()  # the client is gone before the server sends a byte: the body never starts
        with pytest.raises(ClientDisconnect):
            await response(scope, receive, send)
        await upstream.aclose()
        return manager

    manager = asyncio.run(run())
    assert recorder.in_flight == 0 and [ex.status for ex in recorder.finished] == [499]
    assert not manager.in_use  # the adapter is free to be unloaded again
