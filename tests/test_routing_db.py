"""Routing truth in the database (`core.lifecycle` read by `gateway.routing.Router`), on SQLite and
PostgreSQL: the settings seed the alias tables once (however many processes start at once), every
gateway replica follows a promotion or a rollback within seconds without a restart, only `canary` and
`active` versions get traffic, weights split users stickily, and a route with nothing to serve is a 503.

vLLM is an `httpx.MockTransport` per gateway (`create_app(transport=...)`) that remembers which model
each completion named."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.db import Adapter, Alias, AliasTarget, AuditLog, Request, make_engine, session_factory, session_scope
from core.keys import create_key
from core.lifecycle import RouteTarget, set_weights, transition
from core.settings import load_settings
from core.vocab import AdapterStatus
from gateway.app import create_app
from gateway.metrics import Metrics
from gateway.routing import ROUTES_TTL_S, NoServingVersion, Router, pick_target, sticky_fraction

from .conftest import ServerThread

S = AdapterStatus


def settings_for(tmp_path: Path, db_url: str, routes: dict | None = None):
    return load_settings(
        None,
        var_dir=tmp_path,
        database={"url": db_url},
        vllm={"url": "http://vllm.test"},
        guardrails={"enabled": False},
        gateway={
            "key_cache_s": 0,
            "log_flush_interval_s": 0.02,
            "background_tasks": False,
            "requests_per_minute": 100_000,
        },  # fmt: skip
        routes=routes or {},
    )


def add_adapter(sessions, name: str, version: int, status: str = S.CANDIDATE) -> int:
    with session_scope(sessions) as session:
        adapter = Adapter(name=name, version=version, base_model_hash="h", status=status)
        session.add(adapter)
        session.flush()
        return adapter.id


def app_key(sessions) -> str:
    with session_scope(sessions) as session:
        return create_key(session, "app", "app")[0]


class FakeVllm:
    """vLLM as a mock transport: loads any adapter, answers every completion, remembers the model named."""

    def __init__(self) -> None:
        self.models: list[str] = []
        self.loaded: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path.endswith("_lora_adapter"):
            with self.lock:
                self.loaded.append(body["lora_name"])
            return httpx.Response(200, text="ok")
        with self.lock:
            self.models.append(body["model"])
        answer = {
            "id": "x",
            "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
        return httpx.Response(200, json=answer)


def chat(model: str, user: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "user": user}


def logged(sessions, route: str) -> list[tuple[str, int | None]]:
    with sessions() as session:
        return list(session.execute(select(Request.end_user, Request.adapter_id).where(Request.route == route)))


# --- (a) seeding ------------------------------------------------------------------------------------


def test_settings_seed_the_routes_once_even_when_replicas_start_together(tmp_path, migrated_db_url, db_sessions):
    routes = {
        "support": {"targets": [{"adapter": "support"}], "description": "the support assistant"},
        "mixed": {"targets": [{"adapter": None, "weight": 9}, {"adapter": "support", "version": "v1", "weight": 1}]},
        "later": {"targets": [{"adapter": "future"}]},  # its adapter is not registered yet
    }
    settings = settings_for(tmp_path, migrated_db_url, routes)
    v1, v2 = add_adapter(db_sessions, "support", 1), add_adapter(db_sessions, "support", 2)
    add_adapter(db_sessions, "support", 3, S.REJECTED)  # newer, but `latest` never picks a version turned down
    barrier, seeded, errors = threading.Barrier(4), [], []

    def replica() -> None:  # a gateway process starting: its own engine, its own connection
        engine = make_engine(migrated_db_url)
        try:
            router = Router(settings, session_factory(engine))
            barrier.wait()
            seeded.append(router.seed())
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(name for names in seeded for name in names) == ["mixed", "support"]  # each seeded by one
    with db_sessions() as session:
        aliases = {a.name: a for a in session.scalars(select(Alias))}
        assert set(aliases) == {"mixed", "support"} and aliases["support"].description == "the support assistant"
        targets = {
            name: sorted(
                (t.adapter_id or 0, t.weight)
                for t in session.scalars(select(AliasTarget).where(AliasTarget.alias_id == alias.id))
            )  # fmt: skip
            for name, alias in aliases.items()
        }
        assert targets == {"support": [(v2, 1.0)], "mixed": [(0, 9.0), (v1, 1.0)]}  # `latest` is v2
        actions = Counter((a.action, a.object_id) for a in session.scalars(select(AuditLog)))
        assert actions == {("route.seeded", "support"): 1, ("route.seeded", "mixed"): 1,
                           ("adapter.active", str(v1)): 1, ("adapter.active", str(v2)): 1}  # fmt: skip
        assert {a.version: a.status for a in session.scalars(select(Adapter))} == {
            1: S.ACTIVE,
            2: S.ACTIVE,
            3: S.REJECTED,
        }

    # The settings' targets are only a seed: the database is the truth from then on.
    with session_scope(db_sessions) as session:
        set_weights(session, "support", {v1: 1}, actor="test", why="pin v1")
    future = add_adapter(db_sessions, "future", 1)
    assert Router(settings, db_sessions).seed() == ["later"]  # its adapter exists now
    assert Router(settings, db_sessions).seed() == []
    with db_sessions() as session:
        assert session.scalar(select(func.count()).select_from(AuditLog).where(AuditLog.action == "route.seeded")) == 3
        support = session.scalar(select(Alias).where(Alias.name == "support"))
        assert [t.adapter_id for t in support.targets] == [v1]
        assert session.get(Adapter, future).status == S.ACTIVE


# --- (b) every replica follows the database ---------------------------------------------------------


def served_version(url: str, key: str, vllm: FakeVllm, user: str) -> str:
    resp = httpx.post(
        url + "/v1/chat/completions", json=chat("support", user), headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.status_code == 200, resp.text
    return vllm.models[-1]


def switched(replicas, key: str, probes: list[str], expect, since: float) -> list[float]:
    """Per replica, seconds from `since` to the start of the first request (by a user in `probes`, asked
    in turn of each replica) served where `expect(served name)` says; a replica reads one table for
    all its requests, so from then on every user is served from the new one."""
    found: dict[str, float] = {}
    turn = 0
    while len(found) < len(replicas) and time.monotonic() - since < 10:
        for url, vllm in replicas:
            if url not in found:
                started = time.monotonic()
                if expect(served_version(url, key, vllm, probes[turn % len(probes)])):
                    found[url] = started - since
        turn += 1
        time.sleep(0.02)
    assert len(found) == len(replicas), f"not every replica switched in 10 s: {found}"
    return [found[url] for url, _ in replicas]


def test_every_replica_follows_a_promotion_and_a_rollback_without_restart(tmp_path, migrated_db_url, db_sessions):
    settings = settings_for(
        tmp_path, migrated_db_url, {"support": {"targets": [{"adapter": "support", "version": "v1"}]}}
    )
    ids = {v: add_adapter(db_sessions, "support", v) for v in (1, 2, 3)}
    key = app_key(db_sessions)
    users = [f"user-{i}" for i in range(12)]
    fakes = [FakeVllm(), FakeVllm()]
    with (
        ServerThread(create_app(settings, transport=httpx.MockTransport(fakes[0]))) as one,
        ServerThread(create_app(settings, transport=httpx.MockTransport(fakes[1]))) as two,
    ):
        replicas = [(one.url, fakes[0]), (two.url, fakes[1])]
        for url, vllm in replicas:  # both seeded (once) and serve the settings' version
            assert {served_version(url, key, vllm, user) for user in users} == {"support-v1"}

        # An operator (a third session) promotes v2: gate, canary, active; v1 retires; all weight to v2.
        with session_scope(db_sessions) as session:
            v1, v2 = session.get(Adapter, ids[1]), session.get(Adapter, ids[2])
            for status in (S.GATED, S.CANARY, S.ACTIVE):
                transition(session, v2, status, actor="test", why="promotion")
            transition(session, v1, S.RETIRED, actor="test", why="replaced by v2")
            set_weights(session, "support", {ids[2]: 1}, actor="test", why="promotion")
        promoted = time.monotonic()
        assert max(switched(replicas, key, users, lambda m: m == "support-v2", promoted)) < 3.0
        for url, vllm in replicas:
            assert {served_version(url, key, vllm, user) for user in users} == {"support-v2"}

        # v3 as a canary beside v2, then rolled back: its status alone takes it out of every replica.
        with session_scope(db_sessions) as session:
            v3 = session.get(Adapter, ids[3])
            transition(session, v3, S.GATED, actor="test", why="gate passed")
            transition(session, v3, S.CANARY, actor="test", why="canary")
            set_weights(session, "support", {ids[2]: 1, ids[3]: 1}, actor="test", why="canary at 50%")
        canary = time.monotonic()
        on_v3 = [u for u in users if pick_target([RouteTarget(2, "", 2, S.ACTIVE, 1.0), RouteTarget(
            3, "", 3, S.CANARY, 1.0)], sticky_fraction("support", u)).version == 3]  # fmt: skip
        assert on_v3 and len(on_v3) < len(users)  # 12 users: both arms get some
        assert max(switched(replicas, key, on_v3, lambda m: m == "support-v3", canary)) < 3.0
        for url, vllm in replicas:
            assert {u: served_version(url, key, vllm, u) for u in users} == {
                u: "support-v3" if u in on_v3 else "support-v2" for u in users}  # fmt: skip

        with session_scope(db_sessions) as session:
            transition(session, session.get(Adapter, ids[3]), S.ROLLED_BACK, actor="test", why="worse than v2")
        rolled_back = time.monotonic()
        assert max(switched(replicas, key, on_v3, lambda m: m == "support-v2", rolled_back)) < 3.0
        for url, vllm in replicas:
            after = len(vllm.models)
            assert {served_version(url, key, vllm, user) for user in users} == {"support-v2"}
            assert set(vllm.models[after:]) == {"support-v2"}

    rows = logged(db_sessions, "support")  # the traffic log names the version that answered
    assert {adapter_id for _, adapter_id in rows} == set(ids.values())
    with db_sessions() as session:  # seeded once although two replicas started on this database
        assert session.scalar(select(func.count()).select_from(AuditLog).where(AuditLog.action == "route.seeded")) == 1


# --- (c), (d), (e): one gateway ---------------------------------------------------------------------


@pytest.fixture
def gateway(tmp_path, migrated_db_url, db_sessions):
    """One gateway over the fake vLLM; the route `support` is seeded from the settings with v1 active."""
    settings = settings_for(
        tmp_path, migrated_db_url, {"support": {"targets": [{"adapter": "support", "version": "v1"}]}}
    )
    v1 = add_adapter(db_sessions, "support", 1)
    key = app_key(db_sessions)
    vllm = FakeVllm()
    app = create_app(settings, transport=httpx.MockTransport(vllm))
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        yield client, vllm, v1, app


def test_only_canary_and_active_versions_get_traffic(gateway, db_sessions):
    client, vllm, v1, _ = gateway
    others = {status: add_adapter(db_sessions, "support", n, status) for n, status in enumerate(
        (S.CANDIDATE, S.GATED, S.REJECTED, S.ROLLED_BACK, S.RETIRED), start=2)}  # fmt: skip
    with session_scope(db_sessions) as session:
        set_weights(
            session, "support", {v1: 1, **{i: 10 for i in others.values()}}, actor="test", why="hostile weights"
        )
    time.sleep(ROUTES_TTL_S + 0.1)
    for i in range(200):
        resp = client.post("/v1/chat/completions", json=chat("support", f"user-{i}"))
        assert resp.status_code == 200, resp.text
    assert set(vllm.models) == {"support-v1"} and set(vllm.loaded) == {"support-v1"}
    deadline = time.monotonic() + 10
    while len(rows := logged(db_sessions, "support")) < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(rows) == 200 and {adapter_id for _, adapter_id in rows} == {v1}


def test_weights_split_users_and_each_user_keeps_a_version(gateway, db_sessions):
    client, vllm, v1, _ = gateway
    v2 = add_adapter(db_sessions, "support", 2)
    with session_scope(db_sessions) as session:
        adapter = session.get(Adapter, v2)
        transition(session, adapter, S.GATED, actor="test", why="gate passed")
        transition(session, adapter, S.CANARY, actor="test", why="canary at 10%")
        set_weights(session, "support", {v1: 90, v2: 10}, actor="test", why="canary at 10%")
    time.sleep(ROUTES_TTL_S + 0.1)
    first: dict[str, str] = {}
    for i in range(400):
        assert client.post("/v1/chat/completions", json=chat("support", f"user-{i}")).status_code == 200
        first[f"user-{i}"] = vllm.models[-1]
    share = Counter(first.values())["support-v2"] / len(first)
    assert 0.05 < share < 0.15, share
    for i in range(0, 400, 8):  # sticky: the same user lands on the same version every time
        for _ in range(3):
            client.post("/v1/chat/completions", json=chat("support", f"user-{i}"))
            assert vllm.models[-1] == first[f"user-{i}"]


def test_a_route_with_nothing_to_serve_is_a_503_and_database_routes_are_known(gateway, db_sessions):
    client, vllm, v1, app = gateway
    dark = add_adapter(db_sessions, "dark", 1)  # a candidate: never serves
    with session_scope(db_sessions) as session:  # two routes only the database has
        session.add(Alias(name="dark", targets=[AliasTarget(adapter_id=dark, weight=1)]))
        session.add(Alias(name="plain", description="the base model, by another name", targets=[AliasTarget()]))
    time.sleep(ROUTES_TTL_S + 0.1)
    resp = client.post("/v1/chat/completions", json=chat("dark", "alice"))
    assert resp.status_code == 503
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "no_active_version" and error["type"] == "service_unavailable"
    assert "`dark` has no active version" in error["message"]
    assert vllm.models == [] and vllm.loaded == []

    assert client.post("/v1/chat/completions", json=chat("plain", "alice")).status_code == 200
    assert vllm.models == ["base"]
    models = {m["id"]: m.get("description") for m in client.get("/v1/models").json()["data"]}
    assert list(models) == ["base", "support", "dark", "plain"]
    assert models["plain"] == "the base model, by another name"
    assert client.post("/v1/chat/completions", json=chat("made-up", "alice")).status_code == 404
    metrics = client.get("/metrics").text
    assert 'route="dark"' in metrics and 'route="plain"' in metrics and 'route="unknown"' in metrics
    assert "made-up" not in metrics

    # A settings route whose adapter is not registered is not in the table yet: 503 too, not a 500.
    settings = app.state.services.settings.model_copy(
        update={"routes": {**app.state.services.settings.routes, "later": load_settings(
            None, routes={"later": {"targets": [{"adapter": "future"}]}}).routes["later"]}})  # fmt: skip
    router = Router(settings, db_sessions)

    async def resolve():
        await router.refresh()
        return await router.resolve("later", "alice")

    with pytest.raises(NoServingVersion) as err:
        asyncio.run(resolve())
    assert err.value.status_code == 503
    add_adapter(db_sessions, "future", 1)
    router._tried_at = float("-inf")  # as if ROUTES_TTL_S had passed: the refresh seeds it now
    assert asyncio.run(resolve()).served_name == "future-v1"


def test_the_last_table_keeps_serving_while_the_database_is_down(tmp_path, migrated_db_url, db_sessions):
    settings = settings_for(
        tmp_path, migrated_db_url, {"support": {"targets": [{"adapter": "support", "version": "v1"}]}}
    )
    add_adapter(db_sessions, "support", 1)
    down = threading.Event()

    def flaky():
        if down.is_set():
            raise RuntimeError("database unavailable")
        return db_sessions()

    metrics = Metrics()
    router = Router(settings, flaky, metrics, ttl_s=0.0)  # every request reads the table

    async def run():
        first = await router.resolve("support", "alice")
        down.set()
        second = await router.resolve("support", "alice")
        return first, second

    first, second = asyncio.run(run())
    assert first == second and first.served_name == "support-v1"
    assert metrics.route_label("support") == "support" and metrics.route_label("nope") == "unknown"
