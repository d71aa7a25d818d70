"""Gateway overhead, the pure parts: the load split, hey's CSV, statistics, added latency, max_rps.

No servers, no processes, no timing: everything here is a function of its arguments, so the tests
check it directly (`tests/test_bench_gateway_harness.py`). The thresholds that judge a measurement
live here too: a rate is sustained when under `MAX_ERROR_RATE` of the answers are errors and the
achieved throughput is at least `MIN_ACHIEVED_FRACTION` of the target; `max_rps` is the highest
rate up to which every measured rate is sustained with a p99 added latency under `P99_BUDGET_MS`.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

P99_BUDGET_MS = 50.0  # a proxy "sustains" a rate only while its p99 added latency stays under this
MAX_ERROR_RATE = 0.01
MIN_ACHIEVED_FRACTION = 0.95
FOREIGN_WARN_CORES = 0.25  # CPU used by processes that are not the benchmark's, above which results are suspect
WORKER_MARGIN_S = 0.1  # headroom per worker beyond the upstream delay, so the delay never throttles hey


def rate_key(rate: float) -> str:
    """A rate as the key of the per-rate tables in the result ("25", "12.5")."""
    return f"{rate:g}"


def split_rate(rate: float, delay_s: float, margin_s: float = WORKER_MARGIN_S) -> tuple[int, float]:
    """(workers, per-worker qps) for hey so that workers * qps == rate and the delay never throttles.

    hey's workers are closed loops: each waits for its answer before its next tick, so a worker
    that must send every 1/qps s needs 1/qps > delay + margin, i.e. workers >= rate * (delay + margin).
    """
    if rate <= 0:
        raise ValueError("rate must be > 0")
    workers = max(1, math.ceil(rate * (delay_s + margin_s) - 1e-9))
    return workers, rate / workers


def split_workers(workers: int, procs: int) -> list[int]:
    """Workers per hey process when the load is spread over `procs` staggered processes."""
    procs = max(1, min(procs, workers))
    base, extra = divmod(workers, procs)
    return [base + (1 if i < extra else 0) for i in range(procs)]


@dataclass(frozen=True)
class HeyRow:
    latency_s: float
    status: int
    offset_s: float


def parse_hey_csv(text: str, offset_shift_s: float = 0.0) -> list[HeyRow]:
    """Rows of `hey -o csv`: response-time, DNS+dialup, DNS, Request-write, Response-delay,
    Response-read, status-code, offset. hey writes no row for a transport error (timeout, refused
    connection): those only show as requests missing from the schedule."""
    rows: list[HeyRow] = []
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    for record in reader:
        if not record or not record[0].strip():
            continue
        if header is None:
            if record[0].strip() == "response-time":
                header = [h.strip() for h in record]
            continue
        try:
            values = dict(zip(header, record, strict=False))
            rows.append(
                HeyRow(
                    latency_s=float(values["response-time"]),
                    status=int(values["status-code"]),
                    offset_s=float(values.get("offset", 0.0)) + offset_shift_s,
                )
            )
        except (KeyError, ValueError):
            continue  # a truncated last line, or a stray message
    return rows


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def summarize(rows: list[HeyRow], rate: float, duration_s: float, scheduled: int | None = None) -> dict:
    """p50/p99 (ms, of the 2xx answers), error rate (non-2xx share of the answers), achieved rps
    (2xx per second of the run) and whether the rate was sustained."""
    ok = [r.latency_s * 1000.0 for r in rows if 200 <= r.status < 300]
    answered = len(rows)
    errors = answered - len(ok)
    error_rate = errors / answered if answered else 1.0
    achieved = len(ok) / duration_s if duration_s > 0 else 0.0
    out = {
        "target_rps": rate,
        "requests": answered,
        "ok": len(ok),
        "errors": errors,
        "error_rate": round(error_rate, 4),
        "achieved_rps": round(achieved, 2),
        "p50_ms": _r(percentile(ok, 50)),
        "p90_ms": _r(percentile(ok, 90)),
        "p99_ms": _r(percentile(ok, 99)),
        "max_ms": _r(max(ok) if ok else None),
    }
    if scheduled is not None:
        # requests hey's schedule called for that left no row: transport errors, or throttled workers
        out["scheduled"] = scheduled
        out["missing"] = max(0, scheduled - answered)
    out["sustained"] = sustained(out)
    return out


def sustained(stats: dict) -> bool:
    return (
        stats.get("error_rate", 1.0) < MAX_ERROR_RATE
        and stats.get("achieved_rps", 0.0) >= MIN_ACHIEVED_FRACTION * stats["target_rps"]
    )


def added_latency(proxy: dict, direct: dict) -> dict:
    """Per rate: p50/p99 through the proxy minus p50/p99 direct at the same rate (ms)."""
    out: dict = {}
    for rate, stats in proxy.items():
        base = direct.get(rate)
        entry: dict = {"added_p50_ms": None, "added_p99_ms": None}
        if base is not None:
            for q in ("p50", "p99"):
                if stats.get(f"{q}_ms") is not None and base.get(f"{q}_ms") is not None:
                    entry[f"added_{q}_ms"] = round(stats[f"{q}_ms"] - base[f"{q}_ms"], 2)
        out[rate] = entry
    return out


def max_rps(per_rate: dict, budget_ms: float = P99_BUDGET_MS) -> float:
    """The highest rate up to which the proxy sustains every measured rate with p99 added latency
    under `budget_ms`; 0 when it fails at the lowest. `per_rate` maps rate -> stats with
    `sustained` and `added_p99_ms`."""
    best = 0.0
    for rate in sorted(per_rate, key=float):
        stats = per_rate[rate]
        added = stats.get("added_p99_ms")
        if not stats.get("sustained") or added is None or added >= budget_ms:
            break
        best = float(rate)
    return int(best) if best.is_integer() else best
