"""What routes are handed: the services they use, who is calling (API key -> role), what they may spend.

Each route names what it uses with an `Annotated[X, Depends(get_x)]` alias (`Completions`, `Reviews`,
`Models`, `AppCaller`, ...); nothing reads the whole `Services` container, which only the app's
lifespan builds and holds. Tests swap any provider with `app.dependency_overrides[get_x]`. Each
caller alias states the roles it admits: `app` for the OpenAI API, `reviewer` for review, and `admin`
passes every check.

Per-key limits (requests and tokens per minute) are token buckets in this process (`RateLimiter`): with
N gateway replicas a key gets up to N times its limit, so set per-key limits as limit / N, or set
`gateway.redis_url`: the same buckets are then kept in Redis and shared by every replica
(`gateway.ratelimit.RedisRateLimiter`, which falls back to this process's buckets while Redis fails).
Why not the database: a shared counter would put a write on every request's critical path, which is
what the batched traffic log exists to avoid.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import sessionmaker

from core.keys import Principal, hash_key, lookup
from core.settings import GatewaySettings
from core.vocab import Role
from gateway.errors import Forbidden, RateLimited, Unauthenticated
from gateway.metrics import Metrics

if TYPE_CHECKING:
    from core.settings import Settings
    from gateway.openai.service import CompletionService
    from gateway.recorder import TrafficLog
    from gateway.review.service import ReviewService
    from gateway.routing import Router
    from gateway.upstream import Upstream


@dataclass
class Services:
    """Everything one gateway process shares between requests; built and torn down by the app's lifespan."""

    settings: Settings
    sessions: sessionmaker
    upstream: Upstream
    router: Router
    traffic: TrafficLog
    metrics: Metrics
    review: ReviewService
    keys: KeyRing
    completions: CompletionService


def _services(request: Request) -> Services:
    return request.app.state.services


def get_completions(request: Request) -> CompletionService:
    return _services(request).completions


def get_review(request: Request) -> ReviewService:
    return _services(request).review


def get_router(request: Request) -> Router:
    return _services(request).router


def get_upstream(request: Request) -> Upstream:
    return _services(request).upstream


def get_sessions(request: Request) -> sessionmaker:
    return _services(request).sessions


def get_metrics(request: Request) -> Metrics:
    return _services(request).metrics


def get_gateway_settings(request: Request) -> GatewaySettings:
    return _services(request).settings.gateway


def get_keys(request: Request) -> KeyRing:
    return _services(request).keys


# Aliases over the gateway's own classes live beside the routes that use them (`Completions`,
# `Models` in `gateway.openai.router`, `Reviews` in `gateway.review.router`, `Vllm` in `gateway.app`).
Sessions = Annotated[sessionmaker, Depends(get_sessions)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
GatewayConfig = Annotated[GatewaySettings, Depends(get_gateway_settings)]


# --- who is calling -----------------------------------------------------------------------------


@dataclass
class KeyRing:
    """API key -> principal, looked up by hash in the database and cached for `ttl_s` seconds (a revoked
    key stops working within that time). Bounded: at most `size` known keys (least recently used go),
    and at most `negative_size` unknown keys for the shorter `negative_ttl_s` (oldest go), so keys an
    attacker makes up cannot grow the process."""

    sessions: sessionmaker
    ttl_s: float
    size: int = 10_000
    negative_ttl_s: float = 1.0
    negative_size: int = 1_000
    clock: Callable[[], float] = time.monotonic
    cache: OrderedDict[str, tuple[float, Principal]] = field(default_factory=OrderedDict)
    misses: OrderedDict[str, float] = field(default_factory=OrderedDict)

    async def principal(self, key: str) -> Principal | None:
        digest, now = hash_key(key), self.clock()
        hit = self.cache.get(digest)
        if hit is not None and now - hit[0] <= self.ttl_s:
            self.cache.move_to_end(digest)
            return hit[1]
        missed = self.misses.get(digest)
        if missed is not None and now - missed <= min(self.negative_ttl_s, self.ttl_s):
            return None
        found = await asyncio.to_thread(self._find, key)
        self.cache.pop(digest, None)
        self.misses.pop(digest, None)
        if found is None:
            self.misses[digest] = now
            while len(self.misses) > self.negative_size:
                self.misses.popitem(last=False)
        else:
            self.cache[digest] = (now, found)
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return found

    def _find(self, key: str) -> Principal | None:
        with self.sessions() as session:
            return lookup(session, key)


Keys = Annotated[KeyRing, Depends(get_keys)]


def _bearer(authorization: str | None, x_api_key: str | None) -> str:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    if x_api_key:
        return x_api_key.strip()
    raise Unauthenticated(
        "Missing API key: send `Authorization: Bearer <key>` (create one with `tunegate keys create`)"
    )


async def get_caller(
    keys: Keys,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Principal:
    principal = await keys.principal(_bearer(authorization, x_api_key))
    if principal is None:
        raise Unauthenticated("Incorrect API key provided (unknown or revoked)")
    return principal


def require(*roles: Role):
    """A dependency admitting callers whose role is one of `roles` (or `admin`)."""

    async def check(caller: Annotated[Principal, Depends(get_caller)]) -> Principal:
        if caller.role != Role.ADMIN and caller.role not in roles:
            raise Forbidden(f"this endpoint needs a key with role {' or '.join(roles)}; yours is `{caller.role}`")
        return caller

    return check


AppCaller = Annotated[Principal, Depends(require(Role.APP))]
ReviewerCaller = Annotated[Principal, Depends(require(Role.REVIEWER))]
AdminCaller = Annotated[Principal, Depends(require(Role.ADMIN))]


async def metrics_access(
    settings: GatewayConfig,
    keys: Keys,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    """`/metrics` is open when `gateway.metrics_public` (Prometheus on a private network), else admin only."""
    if settings.metrics_public:
        return
    caller = await get_caller(keys, authorization, x_api_key)
    if caller.role != Role.ADMIN:
        raise Forbidden("`/metrics` needs an admin key (`gateway.metrics_public` is false)")


MetricsAccess = Annotated[None, Depends(metrics_access)]


# --- what they may spend ------------------------------------------------------------------------


@dataclass
class Bucket:
    capacity: float
    per_second: float
    level: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    def refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_second)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 when it is now)."""
        self.refill()
        return 0.0 if self.level >= amount else (amount - self.level) / self.per_second


class RateLimiter:
    """Per-key token buckets in this process; a key's own limits, else the gateway's defaults
    (`gateway.*_per_minute`). The request path calls the async `acquire` and `charge`, which
    `gateway.ratelimit.RedisRateLimiter` overrides to share the buckets through Redis."""

    def __init__(self, requests_per_minute: int | None = None, tokens_per_minute: int | None = None) -> None:
        self.default_requests, self.default_tokens = requests_per_minute, tokens_per_minute
        self.requests: dict[int, Bucket] = {}
        self.tokens: dict[int, Bucket] = {}

    @staticmethod
    def _bucket(table: dict[int, Bucket], key_id: int, per_minute: int) -> Bucket:
        bucket = table.get(key_id)
        if bucket is None or bucket.capacity != per_minute:
            bucket = table[key_id] = Bucket(per_minute, per_minute / 60.0)
        return bucket

    def limits(self, caller: Principal) -> tuple[int | None, int | None]:
        """(requests, tokens) per minute for `caller`."""
        return (
            caller.requests_per_minute or self.default_requests,
            caller.tokens_per_minute or self.default_tokens,
        )

    def admit(self, key_id: int, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        """Take one request from the key's budget, or raise `RateLimited` saying when to come back."""
        if tokens_per_minute:
            tokens = self._bucket(self.tokens, key_id, tokens_per_minute)
            wait = tokens.wait_for(1)  # the token budget is spent: wait until it is positive again
            if wait > 0:
                raise RateLimited(f"token limit of {tokens_per_minute} tokens per minute reached", wait)
        if requests_per_minute:
            requests = self._bucket(self.requests, key_id, requests_per_minute)
            wait = requests.wait_for(1)
            if wait > 0:
                raise RateLimited(f"request limit of {requests_per_minute} requests per minute reached", wait)
            requests.level -= 1

    def spend_tokens(self, key_id: int, tokens_per_minute: int | None, tokens: int) -> None:
        """Charge the tokens a finished request used (the bucket may go negative: later requests wait)."""
        if tokens_per_minute and tokens:
            bucket = self._bucket(self.tokens, key_id, tokens_per_minute)
            bucket.refill()
            bucket.level -= tokens

    async def acquire(self, key_id: int, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        """`admit`, as the request path calls it (a shared limiter awaits its backend here)."""
        self.admit(key_id, requests_per_minute, tokens_per_minute)

    async def charge(self, key_id: int, tokens_per_minute: int | None, tokens: int) -> None:
        """`spend_tokens`, as the request path calls it."""
        self.spend_tokens(key_id, tokens_per_minute, tokens)

    async def aclose(self) -> None:
        """Release what the limiter holds (nothing in process; a Redis client's connections)."""
