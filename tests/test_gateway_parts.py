"""Gateway parts without vLLM: canary arithmetic, rate limits, the traffic log (batching, masking,
retention, nothing lost on close), the CLI for keys, `tunegate serve` shutting down cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import func, select

from core.db import Request, ReviewItem, make_engine, session_factory, upgrade, utcnow
from core.settings import GatewaySettings, RouteTarget, load_settings
from gateway.deps import RateLimiter
from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.recorder import TrafficLog, purge_expired
from gateway.routing import pick_target, sticky_fraction

from .conftest import REPO


def test_canary_weights_and_stickiness():
    targets = [RouteTarget(adapter="a", version="v1", weight=9), RouteTarget(adapter="a", version="v2", weight=1)]
    picks = [pick_target(targets, sticky_fraction("support", f"user-{i}")).version for i in range(4000)]
    assert 0.07 < picks.count("v2") / len(picks) < 0.13
    assert len({pick_target(targets, sticky_fraction("support", "bob")).version for _ in range(5)}) == 1
    zero = [RouteTarget(adapter="a", weight=0), RouteTarget(adapter="b", weight=1)]
    assert {pick_target(zero, f / 10).adapter for f in range(10)} == {"b"}


def test_route_settings_are_validated():
    from core.settings import SettingsError

    with pytest.raises(SettingsError, match="weights"):
        load_settings(None, routes={"x": {"targets": [{"adapter": "a", "weight": 0}]}})
    with pytest.raises(SettingsError, match="`routes.x.targets.0.version`"):
        load_settings(None, routes={"x": {"targets": [{"adapter": "a", "version": "3"}]}})
    with pytest.raises(SettingsError, match="base model's name"):
        load_settings(None, routes={"base": {"targets": [{"adapter": "a"}]}})


def test_request_and_token_limits():
    limiter = RateLimiter()
    limiter.admit(1, 2, None)
    limiter.admit(1, 2, None)
    with pytest.raises(RateLimited) as err:
        limiter.admit(1, 2, None)
    assert err.value.status_code == 429 and 1 <= int(err.value.headers["Retry-After"]) <= 30
    limiter.admit(2, None, 100)
    limiter.spend_tokens(2, 100, 250)  # one big answer overdraws the budget
    with pytest.raises(RateLimited, match="token limit"):
        limiter.admit(2, None, 100)


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    return session_factory(make_engine(url))


def row(i: int, **extra) -> dict:
    return {
        "id": f"{i:032x}",
        "created_at": utcnow(),
        "route": "base",
        "endpoint": "chat",
        "stream": False,
        "status_code": 200,
        "prompt_text": "user: hi",
        "answer_text": "hello",
        **extra,
    }


def count(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Request))


def test_traffic_log_batches_and_loses_nothing_on_close(sessions):
    async def run():
        log = TrafficLog(sessions, GatewaySettings(log_batch_size=50, log_flush_interval_s=5.0), Metrics())
        log.start()
        for i in range(120):
            log.record(row(i))
        await asyncio.sleep(0.2)
        written_early = count(sessions)  # two full batches went without waiting for the interval
        await log.close()  # the last 20 rows are written before close returns
        return written_early

    assert asyncio.run(run()) == 100
    assert count(sessions) == 120


def test_traffic_log_keeps_rows_while_the_database_is_down(sessions):
    failures = []

    def flaky_sessions():  # fault injection: the first two writes find the database down
        if len(failures) < 2:
            failures.append(1)
            raise RuntimeError("database unavailable")
        return sessions()

    async def run():
        log = TrafficLog(flaky_sessions, GatewaySettings(log_flush_interval_s=0.01), Metrics(), backoff_s=(0.0, 0.0))
        log.start()
        for i in range(10):
            log.record(row(i))
        await log.close()

    asyncio.run(run())
    assert len(failures) == 2 and count(sessions) == 10


def test_traffic_log_masks_pii_and_can_store_no_text(sessions):
    async def run(settings, i):
        log = TrafficLog(sessions, settings, Metrics())
        log.start()
        log.record(row(i, prompt_text="user: mail me at jane@example.com", request_json={"x": "jane@example.com"}))
        await log.close()

    asyncio.run(run(GatewaySettings(mask_pii=True), 1))
    asyncio.run(run(GatewaySettings(store_text=False), 2))
    with sessions() as session:
        masked, bare = session.get(Request, f"{1:032x}"), session.get(Request, f"{2:032x}")
        assert masked.prompt_text == "user: mail me at [EMAIL]" and masked.request_json == {"x": "[EMAIL]"}
        assert bare.prompt_text is None and bare.answer_text is None and bare.status_code == 200


def test_retention_deletes_old_unreferenced_rows_only(sessions):
    old = utcnow() - timedelta(days=40)
    with sessions() as session:
        session.add_all([Request(**row(1, created_at=old)), Request(**row(2, created_at=old)), Request(**row(3))])
        session.add(ReviewItem(request_id=f"{2:032x}", reason="held"))
        session.commit()
    assert purge_expired(sessions, retention_days=30) == 1
    with sessions() as session:
        assert sorted(r.id[-1] for r in session.scalars(select(Request))) == ["2", "3"]


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEGATE_")}
    env["TUNEGATE_VAR_DIR"] = str(tmp_path)
    return env


def tunegate(tmp_path, *args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "tunegate.cli", *args],
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_keys_cli_create_list_revoke(tmp_path):
    created = json.loads(tunegate(tmp_path, "keys", "create", "svc", "--role", "reviewer", "--json").stdout)
    assert created["key"].startswith("tg-") and created["role"] == "reviewer"
    listed = json.loads(tunegate(tmp_path, "keys", "list", "--json").stdout)
    assert listed[0]["name"] == "svc" and created["key"] not in json.dumps(listed)
    tunegate(tmp_path, "keys", "revoke", "svc")
    assert json.loads(tunegate(tmp_path, "keys", "list", "--json").stdout)[0]["revoked_at"]
    bad = tunegate(tmp_path, "keys", "create", "x", "--role", "root", check=False)
    assert bad.returncode == 2 and "`role`" in bad.stderr


def test_serve_stops_cleanly_on_sigterm_and_keeps_its_log(tmp_path):
    """`tunegate serve` against an unreachable vLLM: it still serves (503s), and SIGTERM ends it with
    code 0 after writing every traffic-log row."""
    from core.io import free_port

    key = json.loads(tunegate(tmp_path, "keys", "create", "app", "--json").stdout)["key"]
    port, dead = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunegate.cli",
            "serve",
            "--vllm-url",
            f"http://127.0.0.1:{dead}",
            "--port",
            str(port),
            "--no-workers",
        ],
        cwd=REPO,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.2)
        assert httpx.get(url + "/readyz").json()["vllm"] is False
        body = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(3):
            resp = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert resp.status_code == 503
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0
    settings = load_settings(None, var_dir=tmp_path)
    with session_factory(make_engine(settings.database_url))() as session:
        assert session.scalar(select(func.count()).select_from(Request).where(Request.status_code == 503)) == 3
