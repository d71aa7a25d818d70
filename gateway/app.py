"""The gateway application: `create_app()` builds the FastAPI app; its lifespan builds the services
(vLLM client, router, adapter manager, limits, guard, recorder and traffic log, review queue, metrics)
into one `Services` container, which the providers of `gateway.deps` hand out piece by piece, and
tears them down, writing every queued traffic-log row before the process exits. At start-up it seeds
the database's routes from the settings' routes it lacks (`core.lifecycle.seed_routes`).

uvicorn runs it as a factory (`gateway.app:create_app`), so nothing is built at import time and
each worker process reads its settings (`TUNEGATE_*`, `tunegate.yaml`) when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text

from core.db import ReviewItem, make_engine, session_factory
from core.settings import Settings, get_settings
from core.vocab import ReviewStatus
from gateway.deps import KeyRing, MetricsAccess, MetricsDep, Services, Sessions, get_upstream
from gateway.errors import install_error_handlers
from gateway.guarding import GuardService
from gateway.limits import BodyLimit
from gateway.metrics import Metrics
from gateway.openai.router import router as openai_router
from gateway.openai.service import CompletionService
from gateway.ratelimit import make_limiter
from gateway.recorder import Recorder, TrafficLog, purge_expired
from gateway.review.router import router as review_router
from gateway.review.service import ReviewService
from gateway.routing import AdapterManager, Router
from gateway.upstream import Upstream

log = logging.getLogger("tunegate.gateway")
Vllm = Annotated[Upstream, Depends(get_upstream)]
RETENTION_EVERY_S = 3600
HOUSEKEEPING_EVERY_S = 15
REVIEW_DEPTH_EVERY_S = 5


def build_services(settings: Settings, transport=None) -> Services:
    if not settings.vllm.url:
        raise RuntimeError("`vllm.url` is not set: start the gateway with `tunegate serve`, which sets it")
    gw = settings.gateway
    sessions = session_factory(make_engine(settings.database_url))
    metrics = Metrics()
    upstream = Upstream(settings.vllm.url, gw, transport=transport)
    router = Router(settings, sessions, metrics)  # refreshes `metrics.serve_routes` with each read
    traffic = TrafficLog(sessions, gw, metrics, var_dir=settings.var_dir)  # spill and dead-letter files
    review = ReviewService(sessions, settings.review, secret_key=settings.secret_key)  # signs the webhooks
    completions = CompletionService(
        limiter=make_limiter(gw, metrics),  # shared through Redis when `gateway.redis_url` is set
        router=router,
        adapters=AdapterManager(upstream, gw.max_loaded_adapters, metrics),
        upstream=upstream,
        guard=GuardService(settings),
        recorder=Recorder(traffic, review, metrics, gw),
    )
    return Services(
        settings=settings,
        sessions=sessions,
        upstream=upstream,
        router=router,
        traffic=traffic,
        metrics=metrics,
        review=review,
        keys=KeyRing(
            sessions,
            gw.key_cache_s,
            size=gw.key_cache_size,
            negative_ttl_s=gw.key_negative_cache_s,
            negative_size=gw.key_negative_cache_size,
        ),
        completions=completions,
    )


class ReviewQueueDepth:
    """The review queue's depth for `/metrics`, counted in the database off the event loop (a worker
    thread), at most once per `every_s` however often Prometheus (or anyone) scrapes."""

    def __init__(self, services: Services, every_s: float = REVIEW_DEPTH_EVERY_S) -> None:
        self.services, self.every_s = services, every_s
        self.counted_at: float | None = None
        self.lock = asyncio.Lock()

    def _count(self) -> float:
        try:
            with self.services.sessions() as session:
                return float(session.scalar(select(func.count()).where(ReviewItem.status == ReviewStatus.PENDING)) or 0)
        except Exception:  # a scrape must not fail because the database blinked
            return float("nan")

    async def refresh(self) -> None:
        async with self.lock:  # concurrent scrapes share one count
            if self.counted_at is not None and time.monotonic() - self.counted_at < self.every_s:
                return
            self.services.metrics.review_queue.set(await asyncio.to_thread(self._count))
            self.counted_at = time.monotonic()


async def _housekeeping(services: Services) -> None:
    """Background work of each replica (all of it idempotent): held answers past their deadline
    follow the fallback (and their webhooks fire) on time; a calibration the eval suite re-fitted is
    taken; old traffic-log rows are purged hourly."""
    days = services.settings.gateway.retention_days
    last_purge = 0.0
    while True:
        try:
            await asyncio.to_thread(services.review.expire_overdue)
            await asyncio.to_thread(services.completions.guard.reload_if_changed)
            if days and time.monotonic() - last_purge > RETENTION_EVERY_S:
                last_purge = time.monotonic()
                removed = await asyncio.to_thread(purge_expired, services.sessions, days)
                if removed:
                    log.info("retention: deleted %d traffic-log rows older than %d days", removed, days)
        except Exception:
            log.exception("housekeeping failed")
        await asyncio.sleep(HOUSEKEEPING_EVERY_S)


def create_app(settings: Settings | None = None, transport=None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        services = build_services(settings, transport)
        # Everything built so far (torch, transformers, the detectors' models) lives as long as the
        # process: move it out of the collector's sight, so full collections stay short pauses.
        gc.collect()
        gc.freeze()
        # The settings' routes the database lacks are seeded (in one transaction), then the table read;
        # a database that does not answer yet is tried again by the first requests.
        await services.router.refresh(force=True)
        services.metrics.serve_routes(name for name, _ in services.router.model_names())
        app.state.review_depth = ReviewQueueDepth(services)
        services.traffic.start()
        app.state.services = services
        retention = None
        if settings.gateway.background_tasks:
            retention = asyncio.create_task(_housekeeping(services))
        try:
            yield
        finally:
            if retention:
                retention.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await retention
            await services.traffic.close()  # every recorded row is written before we exit
            await services.upstream.aclose()
            await services.completions.limiter.aclose()

    app = FastAPI(title="tunegate gateway", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.gateway.limits.max_body_bytes)
    app.include_router(openai_router)
    app.include_router(review_router)

    @app.get("/healthz", tags=["health"], summary="The process is alive (no key)")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="vLLM and the database are reachable (no key)")
    async def readyz(vllm: Vllm, sessions: Sessions) -> JSONResponse:
        def db_ok() -> bool:
            try:
                with sessions() as session:
                    session.execute(text("SELECT 1"))
                return True
            except Exception:
                return False

        checks = {"vllm": await vllm.ready(), "database": await asyncio.to_thread(db_ok)}
        return JSONResponse({"ready": all(checks.values()), **checks}, status_code=200 if all(checks.values()) else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (no key when `metrics_public`)")
    async def metrics(_: MetricsAccess, vllm: Vllm, metrics: MetricsDep) -> Response:
        metrics.circuit_open.set(1 if vllm.breaker.is_open else 0)
        await app.state.review_depth.refresh()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
