"""Shared limits: with `gateway.redis_url` the per-key limits hold for all replicas together.

Against the real Redis on 127.0.0.1:6379 (`deploy/scripts/ensure-services.sh` installs and starts it;
`TUNEGATE_TEST_REDIS_URL` names another): a missing Redis skips on a developer's machine and fails the
run in CI (`skip_or_fail`). The limiter's tests use a random key prefix each and delete their keys;
the two-process test gives its API key a random id, so runs sharing one Redis never meet.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid

import pytest
import redis
import sqlalchemy as sa

from core.db import ApiKey, make_engine, session_factory, session_scope, upgrade
from core.io import free_port
from core.keys import create_key
from core.settings import GatewaySettings, Settings
from gateway.deps import RateLimiter
from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.ratelimit import PREFIX, RedisRateLimiter, make_limiter

from .conftest import skip_or_fail

REDIS_URL = os.environ.get("TUNEGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="module")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as err:
        skip_or_fail(f"Redis is not reachable at {REDIS_URL}: {err}")
    return REDIS_URL


def _delete(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    names = list(client.scan_iter(match=prefix + "*", count=1000))
    if names:
        client.delete(*names)
    client.close()


@pytest.fixture
def prefix(redis_url):
    """A key prefix of this test's own (under `tunegate:ratelimit:`), its keys deleted afterwards."""
    name = f"{PREFIX}test-{uuid.uuid4().hex[:12]}:"
    yield name
    _delete(name)


def _limiters(prefix: str, n: int = 2, **kw) -> list[RedisRateLimiter]:
    """`n` limiters sharing one Redis, as `n` replicas would."""
    return [RedisRateLimiter(REDIS_URL, prefix=prefix, **kw) for _ in range(n)]


async def _close(*limiters: RateLimiter) -> None:
    for limiter in limiters:
        await limiter.aclose()


async def _admitted(limiter: RateLimiter, key_id: int, rpm: int | None, tpm: int | None) -> bool:
    try:
        await limiter.acquire(key_id, rpm, tpm)
        return True
    except RateLimited:
        return False


def test_replicas_share_the_request_limit(prefix):
    async def go():
        a, b = _limiters(prefix)
        try:
            for limiter in (a, b, a):
                await limiter.acquire(1, 3, None)
            with pytest.raises(RateLimited, match="request limit of 3 requests per minute") as refused:
                await b.acquire(1, 3, None)
            retry_after = int(refused.value.headers["Retry-After"])
            assert 1 <= retry_after <= 21  # one request refills in 60 / 3 s
            await a.acquire(2, 3, None)  # another key has its own buckets
        finally:
            await _close(a, b)

    asyncio.run(go())


def test_concurrent_requests_through_two_replicas_admit_exactly_the_limit(prefix):
    """The script is atomic: 40 requests at once through two clients never take more than the 7 there are."""

    async def go():
        a, b = _limiters(prefix)
        try:
            results = await asyncio.gather(*(_admitted((a, b)[i % 2], 9, 7, None) for i in range(40)))
            assert sum(results) == 7
        finally:
            await _close(a, b)

    asyncio.run(go())


def test_tokens_are_charged_after_the_request_and_refuse_the_next_one_on_every_replica(prefix):
    async def go():
        a, b = _limiters(prefix)
        try:
            await a.acquire(5, None, 100)  # the token bucket is full: admitted (nothing is taken yet)
            await a.charge(5, 100, 250)  # one big answer overdraws the budget, as in one process
            for limiter in (a, b):
                with pytest.raises(RateLimited, match="token limit of 100 tokens per minute") as refused:
                    await limiter.acquire(5, 10, 100)
                # back to 1 token from -150 at 100 / 60 per second: about 90 s
                assert 85 <= int(refused.value.headers["Retry-After"]) <= 92
            # a refused request took nothing from the request bucket
            client = redis.Redis.from_url(REDIS_URL)
            assert client.exists(a.keys(5)[0]) == 0
            client.close()
        finally:
            await _close(a, b)

    asyncio.run(go())


def test_every_key_expires_once_its_bucket_would_be_full_again(prefix):
    async def go():
        (a,) = _limiters(prefix, n=1)
        try:
            await a.acquire(3, 60, 1000)
            await a.charge(3, 1000, 500)
        finally:
            await _close(a)

    asyncio.run(go())
    client = redis.Redis.from_url(REDIS_URL)
    names = sorted(n.decode() for n in client.scan_iter(match=prefix + "*"))
    assert names == [f"{prefix}{{3}}:requests", f"{prefix}{{3}}:tokens"]
    ttls = {name: client.pttl(name) for name in names}
    client.close()
    # 1 of 60 requests refills in 1 s, 500 of 1000 tokens in 30 s; each plus one second
    assert 1000 < ttls[f"{prefix}{{3}}:requests"] <= 2000
    assert 30_000 < ttls[f"{prefix}{{3}}:tokens"] <= 31_000


def test_a_changed_limit_starts_a_full_bucket(prefix):
    async def go():
        a, b = _limiters(prefix)
        try:
            await a.acquire(4, 1, None)
            with pytest.raises(RateLimited):
                await b.acquire(4, 1, None)
            await b.acquire(4, 2, None)  # the key's limit was raised: a new, full bucket
            await a.acquire(4, 2, None)
            with pytest.raises(RateLimited):
                await a.acquire(4, 2, None)
        finally:
            await _close(a, b)

    asyncio.run(go())


def test_no_limit_asks_redis_nothing(prefix):
    async def go():
        (a,) = _limiters(prefix, n=1)
        try:
            for _ in range(5):
                await a.acquire(6, None, None)
            await a.charge(6, None, 1000)
        finally:
            await _close(a)

    asyncio.run(go())
    client = redis.Redis.from_url(REDIS_URL)
    assert list(client.scan_iter(match=prefix + "*")) == []
    client.close()


def test_redis_unreachable_fails_open_to_this_replicas_own_limits(redis_url):
    """Rate limits are no access control: a Redis outage must not take the API down, and the local
    buckets still bound each key (at its per-replica limit). Each failure is counted in a metric, and
    Redis is not asked again for `retry_s` (its timeout is not added to every request)."""
    metrics = Metrics()

    def errors() -> float:
        return metrics.registry.get_sample_value("tunegate_rate_limit_backend_errors_total") or 0.0

    async def go():
        limiter = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0", metrics=metrics, retry_s=60)
        try:
            await limiter.acquire(1, 2, None)
            assert errors() == 1
            await limiter.acquire(1, 2, None)
            with pytest.raises(RateLimited, match="request limit of 2"):
                await limiter.acquire(1, 2, None)
            await limiter.charge(1, 100, 50)  # charged to the local bucket
            assert limiter.tokens[1].level <= 50
            assert errors() == 1  # not asked again within `retry_s`
        finally:
            await limiter.aclose()

    asyncio.run(go())


def test_without_redis_url_the_limiter_is_this_process_s(redis_url):
    assert type(make_limiter(GatewaySettings())) is RateLimiter
    shared = make_limiter(GatewaySettings(redis_url=redis_url, requests_per_minute=7), Metrics())
    assert isinstance(shared, RedisRateLimiter) and shared.default_requests == 7
    asyncio.run(shared.aclose())


def test_the_redis_password_never_shows():
    settings = Settings(gateway=GatewaySettings(redis_url="redis://:hunter22@cache.internal:6380/2"))
    assert settings.redacted()["gateway"]["redis_url"] == "redis://:***@cache.internal:6380/2"
    shown = Settings(gateway=GatewaySettings(redis_url="rediss://default:hunter22@cache:6380/0?password=x"))
    assert "hunter22" not in str(shown.redacted()) and "x" not in shown.redacted()["gateway"]["redis_url"][-3:]
    assert "hunter22" not in repr(settings) and "hunter22" not in repr(settings.gateway)
    with pytest.raises(ValueError, match="redis://"):
        GatewaySettings(redis_url="http://:hunter22@cache:6379")


def test_the_redis_password_is_masked_in_settings_errors(monkeypatch, tmp_path):
    from core.settings import SettingsError, load_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNEGATE_CONFIG", raising=False)
    monkeypatch.setenv("TUNEGATE_GATEWAY__REDIS_URL", "http://:hunter22@cache:6379")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "gateway.redis_url" in str(err.value) and "hunter22" not in str(err.value)


# --- two gateway processes ----------------------------------------------------------------------


def _limited_key(db_url: str, requests_per_minute: int) -> tuple[str, int]:
    """An `app` key limited to `requests_per_minute`, with a random id (its buckets' names in Redis)."""
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with session_scope(session_factory(engine)) as session:
            key, row = create_key(session, "shared", "app", requests_per_minute=requests_per_minute)
            key_id = random.randrange(10**8, 10**9)
            session.execute(sa.update(ApiKey).where(ApiKey.id == row.id).values(id=key_id))
        return key, key_id
    finally:
        engine.dispose()


def _admitted_through(gateways, key: str, total: int) -> tuple[int, list[int]]:
    import httpx

    from bench.fault_rig import CHAT

    statuses = []
    for i in range(total):
        gw = gateways[i % len(gateways)]
        answer = httpx.post(
            gw.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        statuses.append(answer.status_code)
    assert set(statuses) <= {200, 429}, statuses
    return statuses.count(200), statuses


@pytest.mark.parametrize("shared", [True, False], ids=["redis", "per-process"])
def test_two_gateway_processes_admit_the_limit_together(tmp_path, redis_url, shared):
    """3N requests alternating between two real gateway processes on one database: with `redis_url`
    they admit N together; without it each admits its own N (2N), as before."""
    from bench.fault_rig import start_gateway, start_upstream
    from bench.gateway_harness import Processes

    n = 5
    db_url = f"sqlite:///{tmp_path / 'tunegate.db'}"
    key, key_id = _limited_key(db_url, n)
    gateway = {"redis_url": redis_url} if shared else {}
    procs = Processes(tmp_path)
    try:
        upstream_port = free_port()
        start_upstream(procs, upstream_port)
        vllm = f"http://127.0.0.1:{upstream_port}"
        gateways = [
            start_gateway(procs, tmp_path / f"gw{i}", vllm, db_url=db_url, gateway=gateway, guardrails=False)
            for i in range(2)
        ]
        started = time.monotonic()
        admitted, statuses = _admitted_through(gateways, key, 3 * n)
        elapsed = time.monotonic() - started
        # a bucket refills one request every 60 / n s: allow for that if the machine was slow
        refilled = int(elapsed * n / 60)
        if shared:
            assert n <= admitted <= n + refilled, statuses
            client = redis.Redis.from_url(redis_url)
            assert client.exists(f"{PREFIX}{{{key_id}}}:requests") == 1
            assert client.pttl(f"{PREFIX}{{{key_id}}}:requests") > 0
            client.close()
            import httpx

            for gw in gateways:
                text = httpx.get(gw.url + "/metrics", timeout=10).text
                assert "tunegate_rate_limit_backend_errors_total 0.0" in text
        else:
            assert 2 * n <= admitted <= 2 * (n + refilled), statuses
    finally:
        procs.stop_all()
        _delete(f"{PREFIX}{{{key_id}}}:")
