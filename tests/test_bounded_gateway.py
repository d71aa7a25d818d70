"""Bounded memory in the gateway: requests an attacker controls cannot grow what a process keeps.

The key cache holds at most `key_cache_size` known keys and `key_negative_cache_size` unknown ones
(misses live a shorter `key_negative_cache_s`); model names no route serves share one metric label;
and `/metrics` never queries the database on the event loop. Time is the key cache's injected clock,
never the wall clock.
"""

from __future__ import annotations

import asyncio
import threading

from core.db import session_scope
from core.keys import create_key
from tests.test_hostile import chat_body, gateway


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_unknown_keys_cannot_grow_the_key_cache(tmp_path):
    with gateway(tmp_path, key_cache_s=60, key_negative_cache_size=16) as (client, _):
        keys = client.app.state.services.keys
        for i in range(200):
            response = client.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": f"Bearer k{i}"})
            assert response.status_code == 401
        assert len(keys.cache) + len(getattr(keys, "misses", {})) <= 16


def test_known_keys_are_a_bounded_lru(tmp_path):
    with gateway(tmp_path, key_cache_s=60, key_cache_size=3) as (client, headers):
        services = client.app.state.services
        with session_scope(services.sessions) as session:
            extra = [create_key(session, f"app{i}", "app")[0] for i in range(5)]
        for key in extra:
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert len(services.keys.cache) == 3
        calls = []
        real = services.keys._find
        services.keys._find = lambda key: calls.append(key) or real(key)
        for key in extra[-3:]:  # the three most recent stay cached
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert calls == []
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {extra[0]}"}).status_code == 200
        assert calls == [extra[0]]  # the least recently used one went


def test_a_miss_is_cached_for_a_shorter_time_than_a_hit(tmp_path):
    with gateway(tmp_path, key_cache_s=60, key_negative_cache_s=1) as (client, headers):
        services = client.app.state.services
        clock = services.keys.clock = Clock()
        key = "tg-not-yet-" + "x" * 20
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
        with session_scope(services.sessions) as session:
            created = create_key(session, "later", "app")[0]
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {created}"}).status_code == 200
        calls = []
        real = services.keys._find
        services.keys._find = lambda k: calls.append(k) or real(k)
        clock.now += 2  # past the miss's 1 s, well within the hit's 60 s
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {created}"}).status_code == 200
        assert calls == [key]  # the miss was looked up again, the hit was not


def test_unknown_model_names_share_one_metric_label(tmp_path):
    with gateway(tmp_path) as (client, headers):
        for i in range(20):
            response = client.post("/v1/chat/completions", json=chat_body(model=f"attacker-{i}"), headers=headers)
            assert response.status_code == 404
        assert client.post("/v1/chat/completions", json=chat_body(), headers=headers).status_code == 200
        text = client.get("/metrics").text
        assert "attacker-" not in text
        assert 'route="unknown"' in text and 'route="base"' in text


def test_metrics_never_query_the_database_on_the_event_loop(tmp_path):
    with gateway(tmp_path) as (client, headers):
        services = client.app.state.services
        real, on_loop = services.sessions, []

        def sessions(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop.append(threading.current_thread().name)
            except RuntimeError:
                pass
            return real(*args, **kwargs)

        services.sessions = sessions
        for _ in range(3):
            response = client.get("/metrics")
            assert response.status_code == 200
            assert "tunegate_review_queue_depth 0.0" in response.text
        assert on_loop == []
