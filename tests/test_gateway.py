"""The gateway against a real vLLM: the official `openai` SDK (sync, async, streaming), routing to
adapters with canary splits and LRU loading, keys and roles, limits, the traffic log, metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import func, select

from core.db import Request, make_engine, session_factory, session_scope, upgrade
from core.keys import create_key
from core.settings import load_settings
from training.domain import Domain
from training.sft import TrainConfig
from training.workflow import train_and_register

from .conftest import ServerThread

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def make_settings(var_dir: Path, base_model_dir: Path, vllm_url: str, **gateway):
    return load_settings(
        None,
        var_dir=var_dir,
        base_model={"path": str(base_model_dir)},
        vllm={"url": vllm_url},
        gateway={"key_cache_s": 0, "log_flush_interval_s": 0.05, **gateway},
        guardrails={"enabled": False},  # the gateway as a pass-through; tests/test_gateway_guard.py adds them
        routes={
            "support": {"targets": [{"adapter": "support"}], "description": "the support assistant"},
            "canary": {
                "targets": [
                    {"adapter": "support", "version": "v1", "weight": 1},
                    {"adapter": "support", "version": "v2", "weight": 1},
                ]
            },
            "pinned": {"targets": [{"adapter": "support", "version": "v1"}]},
        },
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory, base_model_dir, vllm_server):
    """Two registered adapter versions, three keys and a running gateway."""
    var = tmp_path_factory.mktemp("gw")
    settings = make_settings(var, base_model_dir, vllm_server.url)
    upgrade(settings.database_url)
    domain = Domain()
    data = var / "train.jsonl"
    data.write_text("".join(__import__("json").dumps(r) + "\n" for r in domain.drift_rows(replay=0)[:64]))
    for seed in (1, 2):
        config = TrainConfig(name="support", train_file=data, max_steps=8, batch_size=16, seed=seed)
        train_and_register(settings, config, progress=False)
    keys = {}
    with session_scope(session_factory(make_engine(settings.database_url))) as session:
        for role in ("app", "reviewer", "admin"):
            keys[role] = create_key(session, f"test-{role}", role)[0]
        keys["limited"] = create_key(session, "limited", "app", requests_per_minute=2)[0]
        keys["revoked"] = create_key(session, "to-revoke", "app")[0]
    from gateway.app import create_app

    with ServerThread(create_app(settings)) as server:
        yield {"settings": settings, "url": server.url, "keys": keys, "domain": domain, "server": server}


def client(env, role="app") -> openai.OpenAI:
    return openai.OpenAI(base_url=env["url"] + "/v1", api_key=env["keys"][role], max_retries=0)


def ask(fact):
    return [{"role": "user", "content": fact.heldout_questions[0]}]


def test_sdk_sync_chat_answers_an_old_fact(env):
    fact = env["domain"].old_facts[0]
    resp = client(env).chat.completions.create(model="base", messages=ask(fact), max_tokens=12, temperature=0)
    assert resp.choices[0].message.content == fact.answer
    assert resp.model == "base" and resp.usage.completion_tokens > 0


def test_sdk_async_and_streaming_agree_with_plain(env):
    fact = env["domain"].old_facts[1]
    plain = client(env).chat.completions.create(model="base", messages=ask(fact), max_tokens=12, temperature=0)

    async def run():
        aclient = openai.AsyncOpenAI(base_url=env["url"] + "/v1", api_key=env["keys"]["app"], max_retries=0)
        resp = await aclient.chat.completions.create(model="base", messages=ask(fact), max_tokens=12, temperature=0)
        stream = await aclient.chat.completions.create(
            model="base",
            messages=ask(fact),
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts, usage, models = [], None, set()
        async for chunk in stream:
            models.add(chunk.model)
            usage = chunk.usage or usage
            parts.extend(c.delta.content or "" for c in chunk.choices)
        return resp.choices[0].message.content, "".join(parts), usage, models

    async_text, streamed, usage, models = asyncio.run(run())
    assert async_text == streamed == plain.choices[0].message.content
    assert usage is not None and usage.completion_tokens > 0 and models == {"base"}


def test_sync_streaming_without_usage(env):
    fact = env["domain"].old_facts[2]
    stream = client(env).chat.completions.create(
        model="base", messages=ask(fact), max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == fact.answer
    assert all(c.choices for c in chunks)  # no usage-only chunk the client did not ask for


def test_n_logprobs_seed_and_stop(env):
    fact = env["domain"].old_facts[3]
    resp = client(env).chat.completions.create(
        model="base", messages=ask(fact), max_tokens=8, temperature=1.0, seed=7, n=3, logprobs=True, top_logprobs=2
    )
    assert len(resp.choices) == 3
    assert resp.choices[0].logprobs.content and len(resp.choices[0].logprobs.content[0].top_logprobs) == 2
    again = client(env).chat.completions.create(
        model="base", messages=ask(fact), max_tokens=8, temperature=1.0, seed=7, n=3
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in resp.choices]
    fee = next(f for f in env["domain"].old_facts if f.answer.endswith("EUR") and f.attribute == "late_fee")
    stopped = client(env).chat.completions.create(
        model="base", messages=ask(fee), max_tokens=12, temperature=0, stop=[" EUR"]
    )
    assert stopped.choices[0].message.content == fee.answer.removesuffix(" EUR")


def test_text_completions_endpoint(env):
    prompt = "<|bos|><|user|>\n" + env["domain"].old_facts[0].heldout_questions[0] + "<|end|>\n<|assistant|>\n"
    resp = client(env).completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0)
    assert resp.choices[0].text == env["domain"].old_facts[0].answer and resp.model == "base"


def test_models_lists_aliases_only(env):
    ids = [m.id for m in client(env).models.list().data]
    assert ids == ["base", "support", "canary", "pinned"]


def test_unknown_model_is_a_404_in_openai_shape(env):
    with pytest.raises(openai.NotFoundError) as err:
        client(env).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found" and "support" in err.value.body["message"]


def test_bad_parameters_are_400s_naming_the_field(env):
    with pytest.raises(openai.BadRequestError) as err:
        client(env).chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert err.value.body["param"] == "temperature"
    resp = httpx.post(
        env["url"] + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {env['keys']['app']}"},
        json={"model": "base", "messages": []},
    )
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"


def test_keys_and_roles(env):
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    url = env["url"] + "/v1/chat/completions"
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer tg-wrong"}).status_code == 401
    reviewer = httpx.post(url, json=body, headers={"Authorization": f"Bearer {env['keys']['reviewer']}"})
    assert reviewer.status_code == 403 and reviewer.json()["error"]["type"] == "permission_error"
    admin = httpx.post(url, json=body, headers={"Authorization": f"Bearer {env['keys']['admin']}"})
    assert admin.status_code == 200
    revoked = {"Authorization": f"Bearer {env['keys']['revoked']}"}
    assert httpx.post(url, json=body, headers=revoked).status_code == 200
    from core.keys import revoke

    with session_scope(session_factory(make_engine(env["settings"].database_url))) as session:
        assert revoke(session, "to-revoke") == 1
    assert httpx.post(url, json=body, headers=revoked).status_code == 401


def test_rate_limit_answers_429_with_retry_after(env):
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {env['keys']['limited']}"}
    codes = [httpx.post(env["url"] + "/v1/chat/completions", json=body, headers=headers) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert int(codes[2].headers["Retry-After"]) >= 1 and codes[2].json()["error"]["type"] == "rate_limit_error"


def _adapter_rows(env) -> dict[str, int]:
    from core.db import Adapter

    with session_factory(make_engine(env["settings"].database_url))() as session:
        return {f"v{a.version}": a.id for a in session.scalars(select(Adapter))}


def test_alias_routes_to_the_latest_adapter_and_logs_it(env):
    fact = env["domain"].new_facts[0]
    resp = client(env).chat.completions.create(
        model="support", messages=ask(fact), max_tokens=12, temperature=0, user="alice"
    )
    assert resp.model == "support"
    metrics = httpx.get(env["url"] + "/metrics").text
    assert 'tunegate_adapter_operations_total{adapter="support-v2",operation="load",result="ok"}' in metrics
    assert 'adapter_version="support/v2"' in metrics
    rows = _adapter_rows(env)
    assert _wait_for_log(env, lambda r: r.route == "support" and r.end_user == "alice").adapter_id == rows["v2"]


def test_canary_split_is_weighted_and_sticky(env):
    c = client(env)
    seen: dict[str, set[str]] = {}
    for i in range(24):
        user = f"user-{i % 8}"
        c.chat.completions.create(model="canary", messages=[{"role": "user", "content": "hi"}], max_tokens=2, user=user)
    rows = _adapter_rows(env)
    by_id = {v: k for k, v in rows.items()}
    _wait_for_log(env, lambda r: r.route == "canary" and r.end_user == "user-7")
    with session_factory(make_engine(env["settings"].database_url))() as session:
        for r in session.scalars(select(Request).where(Request.route == "canary")):
            seen.setdefault(r.end_user, set()).add(by_id[r.adapter_id])
    assert all(len(versions) == 1 for versions in seen.values())  # sticky per user
    assert set().union(*seen.values()) == {"v1", "v2"}  # both arms get traffic


def _wait_for_log(env, predicate, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    engine = make_engine(env["settings"].database_url)
    while time.monotonic() < deadline:
        with session_factory(engine)() as session:
            for row in session.scalars(select(Request).order_by(Request.created_at.desc()).limit(200)):
                if predicate(row):
                    return row
        time.sleep(0.05)
    raise AssertionError("traffic-log row not written in time")


def test_traffic_log_row_has_usage_latency_and_text(env):
    fact = env["domain"].old_facts[4]
    client(env).chat.completions.create(model="base", messages=ask(fact), max_tokens=12, temperature=0, user="logcheck")
    row = _wait_for_log(env, lambda r: r.end_user == "logcheck")
    assert row.status_code == 200 and row.endpoint == "chat" and row.decision == "allow"
    assert row.answer_text == fact.answer and fact.heldout_questions[0] in row.prompt_text
    assert row.prompt_tokens > 0 and row.completion_tokens > 0
    assert row.latency_ms >= row.upstream_latency_ms > 0


def test_health_ready_and_metrics(env):
    assert httpx.get(env["url"] + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(env["url"] + "/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "vllm": True, "database": True}
    text = httpx.get(env["url"] + "/metrics").text
    for name in (
        "tunegate_requests_total",
        "tunegate_request_duration_seconds_bucket",
        "tunegate_upstream_duration_seconds_bucket",
        "tunegate_gateway_overhead_seconds_bucket",
        "tunegate_tokens_total",
        "tunegate_requests_in_flight",
        "tunegate_guardrail_decisions_total",
        "tunegate_review_queue_depth",
        "tunegate_traffic_log_rows_written_total",
    ):
        assert name in text, name


def test_lru_unloads_beyond_capacity_and_nothing_is_lost_on_shutdown(env, tmp_path, base_model_dir, vllm_server):
    from gateway.app import create_app

    settings = make_settings(env["settings"].var_dir, base_model_dir, vllm_server.url, max_loaded_adapters=1)
    n_before = _count_rows(settings)
    with ServerThread(create_app(settings)) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=env["keys"]["app"], max_retries=0)
        for model in ("pinned", "support", "pinned"):
            c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        metrics = httpx.get(server.url + "/metrics").text
    assert 'tunegate_adapter_operations_total{adapter="support-v1",operation="unload",result="ok"} 1.0' in metrics
    assert 'tunegate_adapter_operations_total{adapter="support-v2",operation="unload",result="ok"} 1.0' in metrics
    assert _count_rows(settings) == n_before + 3  # written by the time the server stopped


def _count_rows(settings) -> int:
    with session_factory(make_engine(settings.database_url))() as session:
        return session.scalar(select(func.count()).select_from(Request))
