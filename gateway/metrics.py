"""Prometheus metrics of one gateway process, named and united after Prometheus' conventions
(`_total` counters, `_seconds` histograms). Each app owns its registry, so tests can build many.

Bounded: a label a client names (the `route`, from the request's `model`) is one of the routes the
gateway serves (`serve_routes`), else `unknown`, so made-up model names cannot grow the registry. And
no metric reads the database when Prometheus scrapes: the review queue's depth is a plain gauge the app
refreshes off the event loop (`gateway.app`)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
UNKNOWN = "unknown"


class Metrics:
    def __init__(self) -> None:
        self.routes: frozenset[str] | None = None  # None: every name is its own label (until `serve_routes`)
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "tunegate_requests",
            "API requests by route, adapter version and HTTP status.",
            ["route", "adapter_version", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "tunegate_request_duration_seconds",
            "Total time from request to last byte.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "tunegate_upstream_duration_seconds",
            "Time spent waiting on vLLM.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead_seconds = Histogram(
            "tunegate_gateway_overhead_seconds",
            "Total time minus vLLM time: what the gateway adds.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.guardrail_seconds = Histogram(
            "tunegate_guardrail_duration_seconds",
            "Time spent in guardrail checks.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("tunegate_tokens", "Tokens by route and kind.", ["route", "kind"], registry=r)
        self.in_flight = Gauge("tunegate_requests_in_flight", "Requests being served now.", registry=r)
        self.decisions = Counter(
            "tunegate_guardrail_decisions", "Guardrail decisions by route.", ["route", "decision"], registry=r
        )
        self.adapter_operations = Counter(
            "tunegate_adapter_operations",
            "Adapter loads and unloads in vLLM.",
            ["adapter", "operation", "result"],
            registry=r,
        )
        self.log_written = Counter("tunegate_traffic_log_rows_written", "Traffic-log rows stored.", registry=r)
        self.log_queue = Gauge("tunegate_traffic_log_queue_depth", "Traffic-log rows waiting.", registry=r)
        self.rate_limited = Counter("tunegate_rate_limited", "Requests refused with 429.", ["kind"], registry=r)
        self.rate_limit_backend_errors = Counter(
            "tunegate_rate_limit_backend_errors",
            "Calls to the shared rate-limit backend (Redis) that failed; the replica limited on its own.",
            registry=r,
        )
        self.circuit_open = Gauge("tunegate_upstream_circuit_open", "1 while the vLLM circuit is open.", registry=r)
        self.review_queue = Gauge("tunegate_review_queue_depth", "Review items waiting for a reviewer.", registry=r)

    def serve_routes(self, routes: Iterable[str]) -> None:
        """The names a `route` label may take; any other becomes `unknown`."""
        self.routes = frozenset(routes)

    def route_label(self, route: str) -> str:
        """The `route` label for a name a client sent: itself if served, else `unknown`."""
        return route if self.routes is None or route in self.routes else UNKNOWN
