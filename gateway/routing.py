"""Routing: a public model name (a route: an alias in the database's `aliases` table, or the base
model's name) to the adapter version that answers, and keeping that adapter loaded in vLLM.

The database is the truth (`core.lifecycle`): each route's weighted targets and each adapter version's
status. The router reads the whole table at most once per `ROUTES_TTL_S` seconds (off the event loop,
one read at a time, requests waiting for it share it), so a promotion or rollback committed by any
process reaches every replica within a couple of seconds, without a restart; if the database cannot be
read the last table keeps serving. Only `canary` and `active` versions (and the base model) get
traffic: a target in any other state is skipped whatever its weight, and a route left with no serving
target answers 503. The settings file's `routes` seed the table for routes it lacks (at start-up, and
again on a refresh while one is missing: its adapter may be registered later); they keep supplying a
route's policy, knowledge base and description.

A route splits traffic between its serving targets by weight, sticky per end user: the same user (the
request's `user` field, the `X-TuneGate-User` header, or else the API key) always lands on the same
version while the weights stay the same. Adapters are loaded into vLLM on first use through its runtime
API and unloaded least recently used beyond `max_loaded_adapters`. A request holds its adapter (`acquire`
... `release`) until its answer is over: an adapter some request is using is never unloaded under it (the
gateway goes over capacity for a while instead), and loads and unloads run one at a time. Clients only
ever see aliases: no path is in any response.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from core.db import Alias
from core.lifecycle import BASE, RouteTarget, route_table, seed_routes, serving_targets
from core.settings import Settings
from core.vllm import VllmError, load_adapter_async, unload_adapter_async
from gateway.errors import GatewayError, ModelNotFound, UpstreamError, UpstreamUnavailable
from gateway.metrics import Metrics
from gateway.upstream import Upstream

ROUTES_TTL_S = 2.0
log = logging.getLogger("tunegate.gateway")


class NoServingVersion(UpstreamUnavailable):
    """The route exists, but none of its targets is a `canary` or `active` version with weight."""

    code = "no_active_version"


@dataclass(frozen=True)
class Target:
    """Where one request goes: the model name vLLM knows, and what to log about it."""

    route: str  # the alias the client named
    served_name: str  # `base`, or `<adapter>-v<version>` as loaded into vLLM
    adapter_id: int | None
    adapter_version: str  # `base` or `support/v3`, for metrics and logs
    path: Path | None  # the registry folder (never shown to clients)


class Weighted(Protocol):
    weight: float


W = TypeVar("W", bound=Weighted)


def sticky_fraction(route: str, user: str) -> float:
    """A stable number in [0, 1) for (route, user): the same user keeps the same canary arm."""
    digest = hashlib.sha256(f"{route}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick_target(targets: Sequence[W], fraction: float) -> W:
    """The target whose share of [0, 1) holds `fraction` (shares in proportion to the weights)."""
    total = sum(t.weight for t in targets)
    edge = 0.0
    for target in targets:
        edge += target.weight / total
        if fraction < edge:
            return target
    return next(t for t in reversed(targets) if t.weight > 0)


@dataclass(frozen=True)
class RouteTable:
    """One read of the database's routes: every route's targets (serving or not) and descriptions."""

    targets: dict[str, list[RouteTarget]] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)


class Router:
    def __init__(
        self, settings: Settings, sessions: sessionmaker, metrics: Metrics | None = None, ttl_s: float = ROUTES_TTL_S
    ) -> None:
        self.settings, self.sessions, self.metrics, self.ttl_s = settings, sessions, metrics, ttl_s
        self._table: RouteTable | None = None
        self._tried_at = float("-inf")  # when the last read started (a failed one too: retried after ttl_s)
        self._refreshing: asyncio.Future[None] | None = None

    # --- the table ----------------------------------------------------------------------------

    def seed(self) -> list[str]:
        """Create the settings' routes the database lacks (`core.lifecycle.seed_routes`); blocking."""
        with self.sessions() as session, session.begin():  # one transaction, committed at the end
            seeded = seed_routes(session, self.settings.routes)
        if seeded:
            log.info("routes seeded from the settings: %s", ", ".join(seeded))
        return seeded

    def _missing(self) -> bool:
        """Some settings route is not in the table (yet): seeding may create it now."""
        return self._table is None or any(name not in self._table.targets for name in self.settings.routes)

    def _read(self) -> RouteTable:
        """Seed what is missing (best effort), then read the whole table; blocking (a worker thread)."""
        if self.settings.routes and self._missing():
            try:
                self.seed()
            except Exception:  # the read below still refreshes what the database has
                log.warning("seeding routes from the settings failed; retried on the next refresh", exc_info=True)
        with self.sessions() as session:
            targets = route_table(session)
            descriptions = {name: text or "" for name, text in session.execute(select(Alias.name, Alias.description))}
        return RouteTable(targets, descriptions)

    async def _refresh(self) -> None:
        self._tried_at = time.monotonic()
        try:
            table = await asyncio.to_thread(self._read)
        except Exception:  # the last table keeps serving; the next request after ttl_s tries again
            log.warning("the routing table could not be read from the database", exc_info=True)
            return
        self._table = table
        if self.metrics is not None:
            self.metrics.serve_routes(name for name, _ in self.model_names())

    async def refresh(self, force: bool = False) -> None:
        """Read the table if it is older than `ttl_s` (or `force`); callers arriving meanwhile share the
        read in progress. Never raises: a failed read leaves the last table in place."""
        if self._refreshing is None or self._refreshing.done():
            if not force and time.monotonic() - self._tried_at < self.ttl_s:
                return
            self._refreshing = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self._refreshing)  # a cancelled request does not cancel the shared read

    async def table(self) -> dict[str, list[RouteTarget]]:
        """Every route's targets, at most `ttl_s` old while the database answers."""
        await self.refresh()
        if self._table is None:
            raise UpstreamUnavailable("the routing table could not be read from the database; retry soon")
        return self._table.targets

    def model_names(self) -> list[tuple[str, str]]:
        """(name, description) of every name a client may send: the base model, the settings' routes,
        then the routes only the database has (as of the last read)."""
        base = self.settings.base_model.served_name
        names = [(base, "the base model")]
        names += [(name, route.description) for name, route in self.settings.routes.items()]
        if self._table is not None:
            names += [(name, self._table.descriptions.get(name, "")) for name in sorted(self._table.targets)
                      if name != base and name not in self.settings.routes]  # fmt: skip
        return names

    # --- one request --------------------------------------------------------------------------

    async def resolve(self, model: str, user: str) -> Target:
        base = self.settings.base_model.served_name
        if model == base:
            return Target(model, base, None, BASE, None)
        routes = await self.table()
        if model not in routes and model not in self.settings.routes:
            known = ", ".join(name for name, _ in self.model_names())
            raise ModelNotFound(f"The model `{model}` does not exist; available: {known}", param="model")
        serving = serving_targets(routes.get(model, []))
        if not serving:
            raise NoServingVersion(
                f"The model `{model}` has no active version right now (no canary or active adapter version "
                "with weight in its route); retry later"
            )
        target = pick_target(serving, sticky_fraction(model, user))
        if target.adapter_id is None:
            return Target(model, base, None, BASE, None)
        version = f"v{target.version}"
        return Target(
            model,
            f"{target.name}-{version}",
            target.adapter_id,
            target.label,
            self.settings.adapters_dir / str(target.name) / version,
        )


class AdapterManager:
    """Which adapters are loaded in vLLM, loading on demand and unloading least recently used among those
    no request is using. Calls go through `core.vllm`'s adapter client over the upstream connection (its
    breaker and retries) and raise the gateway's errors."""

    def __init__(self, upstream: Upstream, capacity: int, metrics: Metrics) -> None:
        self.upstream, self.capacity, self.metrics = upstream, capacity, metrics
        self.loaded: OrderedDict[str, Path] = OrderedDict()
        self.in_use: Counter[str] = Counter()  # served name -> requests using it now
        self._lock = asyncio.Lock()

    async def acquire(self, target: Target) -> None:
        """Load the target's adapter if needed and hold it for one request until `release`."""
        if target.path is None:
            return
        self.in_use[target.served_name] += 1
        try:
            await self.ensure(target)
        except BaseException:
            self.release(target)
            raise

    def release(self, target: Target) -> None:
        """The request that acquired the target's adapter is over."""
        if target.path is None:
            return
        self.in_use[target.served_name] -= 1
        if self.in_use[target.served_name] <= 0:
            del self.in_use[target.served_name]

    async def ensure(self, target: Target) -> None:
        """The target's adapter is loaded in vLLM (loaded now if it was not)."""
        if target.path is None:
            return
        if target.served_name in self.loaded:
            self.loaded.move_to_end(target.served_name)
            return
        async with self._lock:  # one load or unload at a time; others wait for it instead of loading twice
            if target.served_name in self.loaded:
                return
            await self._make_room()
            await self._load(target.served_name, target.path.resolve())
            self.loaded[target.served_name] = target.path

    async def _make_room(self) -> None:
        """Unload least recently used adapters that no request is using, down to below capacity."""
        while len(self.loaded) >= self.capacity:
            idle = next((name for name in self.loaded if not self.in_use.get(name)), None)
            if idle is None:  # every loaded adapter is serving a request: over capacity until they end
                return
            del self.loaded[idle]
            await self._unload(idle)

    def forget(self, target: Target) -> None:
        """vLLM no longer has this adapter (another replica unloaded it, or vLLM restarted)."""
        self.loaded.pop(target.served_name, None)

    def _count(self, name: str, operation: str, ok: bool) -> None:
        self.metrics.adapter_operations.labels(adapter=name, operation=operation, result="ok" if ok else "error").inc()

    async def _load(self, name: str, path: Path) -> None:
        try:
            await load_adapter_async(self.upstream.post, name, path)
        except (VllmError, UpstreamError) as err:  # vLLM answered, and not with the adapter loaded
            self._count(name, "load", ok=False)
            raise UpstreamUnavailable(f"vLLM could not load adapter `{name}`: {err}") from err
        except GatewayError:  # vLLM unreachable, too slow, or the breaker is open
            self._count(name, "load", ok=False)
            raise
        except Exception as err:  # anything else still reaches the client as an OpenAI-shaped error
            self._count(name, "load", ok=False)
            raise UpstreamUnavailable(f"vLLM could not load adapter `{name}` ({type(err).__name__})") from err
        self._count(name, "load", ok=True)

    async def _unload(self, name: str) -> None:
        """Best effort: an adapter vLLM cannot unload (or already dropped) is counted, not raised."""
        try:
            await unload_adapter_async(self.upstream.post, name)
        except Exception:  # VllmError, GatewayError, or anything else: vLLM keeps it, we do not
            self._count(name, "unload", ok=False)
            return
        self._count(name, "unload", ok=True)
