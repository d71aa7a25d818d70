"""FastAPI dependencies: the process's services, and who is calling (API key -> role).

Routes ask for what they need with `Annotated[...]` aliases (`Svc`, `AppCaller`, ...); tests swap
any of them with `app.dependency_overrides`. Each endpoint's alias states the roles it admits:
`app` for the OpenAI API, `reviewer` for review, `admin` for everything (admin passes every check).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import sessionmaker

from core.keys import Principal, hash_key, lookup
from core.settings import Settings
from gateway.errors import Forbidden, Unauthenticated
from gateway.guarding import GuardService
from gateway.limits import RateLimiter
from gateway.metrics import Metrics
from gateway.review.service import ReviewService
from gateway.routing import AdapterManager, Router
from gateway.traffic import TrafficLog
from gateway.upstream import Upstream


@dataclass
class Services:
    """Everything one gateway process shares between requests; built once by the app's lifespan."""

    settings: Settings
    sessions: sessionmaker
    upstream: Upstream
    router: Router
    adapters: AdapterManager
    limiter: RateLimiter
    traffic: TrafficLog
    metrics: Metrics
    guard: GuardService
    review: ReviewService
    key_cache: dict[str, tuple[float, Principal | None]]


def get_services(request: Request) -> Services:
    return request.app.state.services


Svc = Annotated[Services, Depends(get_services)]


def _bearer(authorization: str | None, x_api_key: str | None) -> str:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    if x_api_key:
        return x_api_key.strip()
    raise Unauthenticated(
        "Missing API key: send `Authorization: Bearer <key>` (create one with `tunegate keys create`)"
    )


async def get_caller(
    services: Svc,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Principal:
    key = _bearer(authorization, x_api_key)
    digest = hash_key(key)
    cached = services.key_cache.get(digest)
    now = time.monotonic()
    if cached is None or now - cached[0] > services.settings.gateway.key_cache_s:
        with_session = services.sessions

        def find() -> Principal | None:
            with with_session() as session:
                return lookup(session, key)

        cached = (now, await asyncio.to_thread(find))
        services.key_cache[digest] = cached
    if cached[1] is None:
        raise Unauthenticated("Incorrect API key provided (unknown or revoked)")
    return cached[1]


def require(*roles: str):
    """A dependency admitting callers whose role is one of `roles` (or `admin`)."""

    async def check(caller: Annotated[Principal, Depends(get_caller)]) -> Principal:
        if caller.role != "admin" and caller.role not in roles:
            raise Forbidden(f"this endpoint needs a key with role {' or '.join(roles)}; yours is `{caller.role}`")
        return caller

    return check


AppCaller = Annotated[Principal, Depends(require("app"))]
ReviewerCaller = Annotated[Principal, Depends(require("reviewer"))]
AdminCaller = Annotated[Principal, Depends(require("admin"))]


async def metrics_access(
    services: Svc,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    """`/metrics` is open when `gateway.metrics_public` (Prometheus on a private network), else admin only."""
    if services.settings.gateway.metrics_public:
        return
    caller = await get_caller(services, authorization, x_api_key)
    if caller.role != "admin":
        raise Forbidden("`/metrics` needs an admin key (`gateway.metrics_public` is false)")


MetricsAccess = Annotated[None, Depends(metrics_access)]
