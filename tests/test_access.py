"""Access, as one table: every endpoint x every kind of caller (no key, an app, another app, a reviewer,
an admin, a revoked key), against the status each must get. A route the table does not list fails the
test, so a new endpoint cannot ship without its row."""

from __future__ import annotations

import uuid

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from core.db import make_engine, session_factory, session_scope, upgrade, utcnow
from core.keys import create_key, revoke
from core.settings import load_settings
from gateway.app import create_app
from gateway.review.service import ReviewService

from .test_gateway_path import FakeVllm

CALLERS = ("none", "app", "other_app", "reviewer", "admin", "revoked")
DENIED = {401, 403, 404}  # 404: an app asking for another app's review outcome learns nothing
OK = "ok"  # any status outside DENIED and below 500: the caller got past the access check
OPEN = "open"  # no key needed: anything but 401/403 (readiness may say 503 when a dependency is down)


def fake_vllm():
    """The path tests' fake vLLM, plus the bodiless GETs (`/v1/models`, `/health`) readiness sends."""
    answer = FakeVllm()
    return lambda request: answer(request) if request.content else httpx.Response(200, json={"data": []})


def chat_body() -> dict:
    return {"model": "base", "messages": [{"role": "user", "content": "Which region is T896 sold in?"}],
            "max_tokens": 4}  # fmt: skip


# (method, path, body, {caller: expected}); `{item}` is a held item of the `app` caller.
APP_ONLY = {"none": 401, "app": OK, "other_app": OK, "reviewer": 403, "admin": OK, "revoked": 401}
REVIEWERS = {"none": 401, "app": 403, "other_app": 403, "reviewer": OK, "admin": OK, "revoked": 401}
ANYONE = dict.fromkeys(CALLERS, OK)
TABLE = [
    ("POST", "/v1/chat/completions", chat_body(), APP_ONLY),
    ("POST", "/v1/completions", {"model": "base", "prompt": "T896 is sold in", "max_tokens": 4}, APP_ONLY),
    ("GET", "/v1/models", None, APP_ONLY),
    ("GET", "/v1/reviews/{item}", None,
     {"none": 401, "app": OK, "other_app": 404, "reviewer": 403, "admin": OK, "revoked": 401}),
    ("POST", "/v1/review/claim", None, REVIEWERS),
    ("POST", "/v1/review/items/{item}/decision", {"verdict": "approve"}, REVIEWERS),
    ("GET", "/v1/review/queue", None, REVIEWERS),
    ("GET", "/v1/review/agreement", None, REVIEWERS),
    ("GET", "/metrics", None, {"none": 401, "app": 403, "other_app": 403, "reviewer": 403, "admin": OK,
                               "revoked": 401}),
    ("GET", "/healthz", None, ANYONE),
    ("GET", "/readyz", None, dict.fromkeys(CALLERS, OPEN)),
    ("GET", "/review", None, ANYONE),  # the page itself holds no data; its API calls are checked above
]  # fmt: skip


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("access")
    gateway = {"key_cache_s": 0, "metrics_public": False, "background_tasks": False}
    settings = load_settings(None, var_dir=tmp, vllm={"url": "http://vllm.test"}, guardrails={"enabled": False},
                             gateway=gateway)  # fmt: skip
    upgrade(settings.database_url)
    sessions = session_factory(make_engine(settings.database_url))
    with session_scope(sessions) as session:
        keys = {
            "app": create_key(session, "shop", "app"),
            "other_app": create_key(session, "other-shop", "app"),
            "reviewer": create_key(session, "alice", "reviewer"),
            "admin": create_key(session, "root", "admin"),
            "revoked": create_key(session, "gone", "app"),
        }
        revoke(session, "gone")
        app_key_id = keys["app"][1].id
    row = {"id": uuid.uuid4().hex, "created_at": utcnow(), "api_key_id": app_key_id, "route": "base",
           "endpoint": "chat", "status_code": 202, "request_json": chat_body(),
           "prompt_text": "user: Which region is T896 sold in?", "answer_text": "Highcliff", "risk": 0.8,
           "decision": "hold"}  # fmt: skip
    item = ReviewService(sessions, settings.review).hold(row, context=None, scores={}, unsupported_spans=[])
    app = create_app(settings, transport=httpx.MockTransport(fake_vllm()))
    with TestClient(app) as client:
        yield app, client, {name: key for name, (key, _) in keys.items()}, item


def test_every_route_has_a_row():
    app = create_app(load_settings(None, vllm={"url": "http://vllm.test"}))
    routes = {(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in r.methods if m != "HEAD"}
    listed = {(method, path.replace("{item}", "{item_id}")) for method, path, _, _ in TABLE}
    assert routes - listed == set(), "add the new endpoint to TABLE with the status each caller must get"


@pytest.mark.parametrize(("method", "path", "body", "expected"), TABLE, ids=[f"{m} {p}" for m, p, _, _ in TABLE])
def test_each_caller_gets_what_its_role_allows(gateway, method, path, body, expected):
    _, client, keys, item = gateway
    violations = []
    for caller in CALLERS:
        headers = {} if caller == "none" else {"Authorization": f"Bearer {keys[caller]}"}
        resp = client.request(method, path.format(item=item), json=body, headers=headers)
        want = expected[caller]
        allowed = resp.status_code not in DENIED and resp.status_code < 500
        if want == OPEN:
            wrong = resp.status_code in (401, 403)
        else:
            wrong = not allowed if want == OK else resp.status_code != want
        if wrong:
            violations.append(f"{caller}: got {resp.status_code}, want {want}: {resp.text[:160]}")
        if resp.status_code in (401, 403, 404) and resp.headers.get("content-type", "").startswith("application/json"):
            assert set(resp.json().get("error", {})) >= {"message", "type"}, resp.text  # OpenAI's error shape
    assert not violations, "\n".join(violations)


def test_the_app_signs_its_webhooks_and_keeps_its_spill_files_under_var_dir(tmp_path):
    """The wiring: the review service gets the secret key (webhooks are signed), the traffic log the
    configured `var_dir` (spill and dead-letter files are not written to the working directory)."""
    settings = load_settings(None, var_dir=tmp_path, vllm={"url": "http://vllm.test"},
                             review={"webhook_url": "http://hooks.test/x"})  # fmt: skip
    upgrade(settings.database_url)
    app = create_app(settings, transport=httpx.MockTransport(fake_vllm()))
    with TestClient(app):
        services = app.state.services
        assert services.review.webhooks.secret == settings.secret_key.get_secret_value()
        assert {services.traffic.spill.path.parent, services.traffic.dead_letters.path.parent} == {tmp_path}


def test_a_bug_of_ours_is_a_500_in_openai_shape(tmp_path):
    settings = load_settings(None, var_dir=tmp_path, vllm={"url": "http://vllm.test"})
    upgrade(settings.database_url)
    app = create_app(settings, transport=httpx.MockTransport(fake_vllm()))

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.get("/boom")
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error"
