"""Routing: a public model name (an alias from the settings' `routes`, or the base model's name)
to the adapter version that answers, and keeping that adapter loaded in vLLM.

An alias splits traffic between its targets by weight, sticky per end user: the same user (the
request's `user` field, the `X-TuneGate-User` header, or else the API key) always lands on the same
version while the weights stay the same. `latest` resolves through the `adapters` table (newest
servable version) and is cached for a few seconds, so a promotion reaches every replica quickly.
Adapters are loaded into vLLM on first use through its runtime API and unloaded least recently used
beyond `max_loaded_adapters`. A request holds its adapter (`acquire` ... `release`) until its answer is
over: an adapter some request is using is never unloaded under it (the gateway goes over capacity for
a while instead), and loads and unloads run one at a time. Clients only ever see aliases: no path is in
any response.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from core.db import Adapter
from core.settings import RouteTarget, Settings
from core.vllm import VllmError, load_adapter_async, unload_adapter_async
from gateway.errors import GatewayError, ModelNotFound, UpstreamError, UpstreamUnavailable
from gateway.metrics import Metrics
from gateway.upstream import Upstream

RESOLVE_TTL_S = 5.0


@dataclass(frozen=True)
class Target:
    """Where one request goes: the model name vLLM knows, and what to log about it."""

    route: str  # the alias the client named
    served_name: str  # `base`, or `<adapter>-<version>` as loaded into vLLM
    adapter_id: int | None
    adapter_version: str  # `base` or `support/v3`, for metrics and logs
    path: Path | None  # the registry folder (never shown to clients)


def sticky_fraction(route: str, user: str) -> float:
    """A stable number in [0, 1) for (route, user): the same user keeps the same canary arm."""
    digest = hashlib.sha256(f"{route}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick_target(targets: list[RouteTarget], fraction: float) -> RouteTarget:
    total = sum(t.weight for t in targets)
    edge = 0.0
    for target in targets:
        edge += target.weight / total
        if fraction < edge:
            return target
    return next(t for t in reversed(targets) if t.weight > 0)


class Router:
    def __init__(self, settings: Settings, sessions: sessionmaker) -> None:
        self.settings = settings
        self.sessions = sessions
        self._resolved: dict[tuple[str, str], tuple[float, tuple[int, int]]] = {}

    def model_names(self) -> list[tuple[str, str]]:
        base = self.settings.base_model.served_name
        return [(base, "the base model")] + [(name, r.description) for name, r in self.settings.routes.items()]

    async def _resolve_version(self, name: str, version: str) -> tuple[int, int]:
        """(adapter id, version number) of `name`/`version` from the adapters table (cached)."""
        key = (name, version)
        cached = self._resolved.get(key)
        if cached and time.monotonic() - cached[0] < RESOLVE_TTL_S:
            return cached[1]
        row = await asyncio.to_thread(self._query_version, name, version)
        if row is None:
            raise GatewayError(
                f"route target `{name}` {version} is not a registered, servable adapter; "
                "train and register it, or fix the route in the settings"
            )
        self._resolved[key] = (time.monotonic(), row)
        return row

    def _query_version(self, name: str, version: str) -> tuple[int, int] | None:
        query = select(Adapter.id, Adapter.version).where(Adapter.name == name, Adapter.servable.is_(True))
        if version == "latest":
            query = query.order_by(Adapter.version.desc()).limit(1)
        else:
            query = query.where(Adapter.version == int(version.removeprefix("v")))
        with self.sessions() as session:
            row = session.execute(query).first()
        return None if row is None else (row[0], row[1])

    async def resolve(self, model: str, user: str) -> Target:
        base = self.settings.base_model.served_name
        if model == base:
            return Target(model, base, None, "base", None)
        route = self.settings.routes.get(model)
        if route is None:
            known = ", ".join(name for name, _ in self.model_names())
            raise ModelNotFound(f"The model `{model}` does not exist; available: {known}", param="model")
        target = pick_target(route.targets, sticky_fraction(model, user))
        if target.adapter is None:
            return Target(model, base, None, "base", None)
        adapter_id, number = await self._resolve_version(target.adapter, target.version)
        version = f"v{number}"
        return Target(
            model,
            f"{target.adapter}-{version}",
            adapter_id,
            f"{target.adapter}/{version}",
            self.settings.adapters_dir / target.adapter / version,
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
