"""Gateway overhead: the latency a proxy adds in front of an OpenAI-compatible upstream.

Side by side in one run, on the same cores:
- a mock OpenAI upstream (`bench/mock_upstream.py`) that answers after a fixed delay (50 ms);
- Debian's `hey` (compiled) as the load generator, at constant rates (25 ... 400 requests/s);
- three targets measured at every rate: `direct` (hey straight to the mock: the baseline),
  `litellm` (LiteLLM's proxy, production settings) and `ours` (tunegate's gateway).

Added latency at a rate = p50/p99 through the proxy - p50/p99 direct at the same rate. A rate is
sustained when under 1% of the answers are errors and the achieved throughput is at least 95% of
the target; a proxy's `max_rps` is the highest rate up to which it sustains every measured rate
with a p99 added latency under 50 ms.

Prints one JSON object; writes `gateway_overhead.json` and `gateway_overhead.png` to `--out`.
Run: `python -m bench.gateway_overhead [--targets direct,litellm,ours] [--duration 8]`.
Every process it starts runs in its own process group and is stopped on the way out, Ctrl-C
included. It only ever sends traffic to 127.0.0.1.

This module is the run (`run(config)`), the report (`finish`, `plot_overhead`) and the command
line (`main`); the settings are `bench.gateway_config.GatewayBenchConfig`, the statistics
`bench.gateway_stats`, the processes and hey runs `bench.gateway_harness`, the proxies
`bench.gateway_targets`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gateway_config import GatewayBenchConfig
from bench.gateway_harness import HOST, Processes, Target, measure_target, remeasure_direct, wait_ready
from bench.gateway_stats import (
    FOREIGN_WARN_CORES,
    MAX_ERROR_RATE,
    MIN_ACHIEVED_FRACTION,
    P99_BUDGET_MS,
    added_latency,
    max_rps,
    rate_key,
    split_rate,
)
from bench.gateway_targets import start_litellm, start_ours
from core.io import atomic_write_bytes, free_port

PROXIES = ("litellm", "ours")
TARGET_ERRORS = (RuntimeError, OSError, subprocess.SubprocessError, ValueError)


def run(config: GatewayBenchConfig | None = None, stderr=sys.stderr) -> dict:
    """Measure the targets at every rate; returns (and writes) the result as a dict."""
    config = config or GatewayBenchConfig()
    hey_path = shutil.which(config.hey)
    if hey_path is None:
        raise RuntimeError(f"`{config.hey}` not found: apt-get install -y hey")
    config = dataclasses.replace(config, hey=hey_path)
    rates, delay_ms, model = config.rates, config.delay_ms, config.model
    out_dir = config.out
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result: dict = {
        "benchmark": "gateway_overhead",
        "config": {
            "rates_rps": list(rates),
            "duration_s": config.duration,
            "upstream_delay_ms": delay_ms,
            "cpu_count": os.cpu_count(),
            "hey": hey_path,
            "hey_version": _dpkg_version("hey"),
            "hey_procs": config.hey_procs,
            "hey_split": {
                rate_key(r): dict(zip(("workers", "qps_per_worker"), split_rate(r, delay_ms / 1000), strict=True))
                for r in rates
            },  # fmt: skip
            "warmup_s": config.warmup,
            "quiet_wait_s": config.quiet_wait,
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
            "mock_upstream": {
                "workers": config.mock_workers,
                "server": "uvicorn + raw ASGI (bench/mock_upstream.py)",
            },
            "sustained": f"error rate < {MAX_ERROR_RATE:.0%} and achieved >= {MIN_ACHIEVED_FRACTION:.0%} of target",
            "max_rps": f"highest rate up to which every rate is sustained with p99 added < {P99_BUDGET_MS:g} ms",
            "latency": "hey's response-time of 2xx answers; error rate = non-2xx share of hey's rows",
        },
        "targets": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="tunegate-gwbench-"))
    procs = Processes(tmp)
    try:
        mock_port = free_port()
        mock_url = f"http://{HOST}:{mock_port}"
        mock_cmd = [
            sys.executable, "-m", "bench.mock_upstream", "--host", HOST, "--port", str(mock_port),
            "--delay-ms", f"{delay_ms:g}", "--workers", str(config.mock_workers), "--models", f"{model},base",
        ]  # fmt: skip
        mock = procs.start("mock", mock_cmd)
        wait_ready(mock, mock_url, ["/v1/models"], None, 60)
        for name in config.targets:
            entry: dict = {}
            result["targets"][name] = entry
            proc = None
            try:
                if name == "direct":
                    target = Target("direct", mock_url, "sk-mock", model)
                else:
                    entry["setup"] = {}
                    start = start_litellm if name == "litellm" else start_ours
                    target = start(procs, tmp, mock_url, config, entry["setup"])
                proc = target.proc
                own = [mock] + ([proc] if proc is not None else [])
                per_rate = measure_target(target, own, rates, config, tmp, stderr)
                entry["rates"] = {rate_key(r): s for r, s in per_rate.items()}
                if proc is not None:
                    entry["processes_seen"] = len(proc.seen_pids)
            except TARGET_ERRORS as e:
                entry["error"] = f"{type(e).__name__}: {e}"[:3000]
                print(f"[gateway_overhead] {name}: {entry['error'][:400]}", file=stderr, flush=True)
            finally:
                if proc is not None:
                    procs.stop(proc)
        try:
            remeasure_direct(result, mock, mock_url, config, tmp, stderr)
        except TARGET_ERRORS as e:
            result["targets"]["direct"]["remeasure_error"] = f"{type(e).__name__}: {e}"[:1000]
    finally:
        procs.stop_all()
        if os.environ.get("GWBENCH_KEEP_TMP"):
            print(f"[gateway_overhead] logs kept in {tmp}", file=stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    finish(result, out_dir, config.plot)
    result["wall_s"] = round(time.monotonic() - started, 1)
    atomic_write_bytes(out_dir / "gateway_overhead.json", (json.dumps(result, indent=2) + "\n").encode())
    return result


def finish(result: dict, out_dir: Path, plot: bool = True) -> dict:
    """Added latency, max_rps and the headline numbers, from the per-rate stats in `result`."""
    targets = result["targets"]
    direct = targets.get("direct", {}).get("rates", {})
    for name in PROXIES:
        entry = targets.get(name)
        if entry is None:
            continue
        per_rate = entry.get("rates")
        if not per_rate or not direct:
            result[f"{name}_p99_overhead_ms_at_50"] = None
            result[f"{name}_p50_overhead_ms_at_50"] = None
            result[f"{name}_max_rps"] = None
            continue
        for rate, added in added_latency(per_rate, direct).items():
            per_rate[rate].update(added)
            per_rate[rate]["baseline_sustained"] = direct.get(rate, {}).get("sustained")
        at_50 = per_rate.get("50", {})
        result[f"{name}_p99_overhead_ms_at_50"] = at_50.get("added_p99_ms")
        result[f"{name}_p50_overhead_ms_at_50"] = at_50.get("added_p50_ms")
        result[f"{name}_max_rps"] = max_rps(per_rate)
    busiest = max(
        (s.get("foreign_cpu_cores", 0.0) for t in targets.values() for s in (t.get("rates") or {}).values()),
        default=0.0,
    )
    result["max_foreign_cpu_cores"] = busiest
    if busiest > FOREIGN_WARN_CORES:
        result["warning"] = (
            f"other processes used up to {busiest:.2f} of {os.cpu_count()} cores during a measurement: "
            "latencies are inflated by contention; rerun on a quiet machine (see --quiet-wait)"
        )
    for name in PROXIES:  # the headline keys exist even for targets not measured
        for k in ("p99_overhead_ms_at_50", "p50_overhead_ms_at_50", "max_rps"):
            result.setdefault(f"{name}_{k}", None)
    if plot:
        try:
            result["plot"] = str(plot_overhead(result, out_dir / "gateway_overhead.png"))
        except Exception as e:  # noqa: BLE001 - a plot failure must not lose the measurements
            result["plot_error"] = f"{type(e).__name__}: {e}"
    result["json"] = str(out_dir / "gateway_overhead.json")
    return result


def plot_overhead(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    floor = 0.1
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    colors = {"litellm": "tab:orange", "ours": "tab:blue"}
    labels = {"litellm": "LiteLLM proxy", "ours": "tunegate gateway"}
    drawn = False
    plotted: list[float] = []
    for name in PROXIES:
        per_rate = result["targets"].get(name, {}).get("rates")
        if not per_rate:
            continue
        points = [(float(r), s) for r, s in per_rate.items() if s.get("added_p99_ms") is not None]
        points.sort()
        if not points:
            continue
        xs = [r for r, _ in points]
        ys = [max(s["added_p99_ms"], floor) for _, s in points]
        plotted += ys
        label = f"{labels[name]} (max {result.get(f'{name}_max_rps')} rps)"
        ax.plot(xs, ys, "-", color=colors[name], label=label)
        for x, (_, s), y in zip(xs, points, ys, strict=True):
            ax.plot(x, y, "o", color=colors[name], markerfacecolor=colors[name] if s["sustained"] else "white")
        drawn = True
    ax.axhline(P99_BUDGET_MS, color="tab:red", linestyle="--", linewidth=1, label=f"{P99_BUDGET_MS:g} ms budget")
    ax.set_yscale("log")
    ax.set_xscale("log")
    top = max([P99_BUDGET_MS * 2, *plotted])
    bottom = min([P99_BUDGET_MS / 10, *plotted])
    ax.set_ylim(bottom / 1.5, top * 1.5)
    ticks = [t * 10**e for e in range(-1, 5) for t in (1, 2, 5)]
    ax.set_yticks([t for t in ticks if bottom / 1.5 <= t <= top * 1.5])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    rates = result["config"]["rates_rps"]
    ax.set_xticks(rates)
    ax.set_xticklabels([f"{r:g}" for r in rates])
    ax.minorticks_off()
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("p99 added latency vs direct (ms, log)")
    cfg = result["config"]
    ax.set_title(
        f"Gateway overhead: mock upstream {cfg['upstream_delay_ms']:g} ms, {cfg['cpu_count']} cores, "
        f"hey {cfg['duration_s']:g} s/rate",
        fontsize=10,
    )
    note = f"hollow: rate not sustained; values <= {floor:g} ms drawn at {floor:g}"
    ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=7, color="0.4")
    if result.get("max_foreign_cpu_cores", 0.0) > FOREIGN_WARN_CORES:
        ax.text(
            0.99, 0.01, f"other processes used up to {result['max_foreign_cpu_cores']:.2f} cores: contended",
            transform=ax.transAxes, fontsize=7, color="tab:red", ha="right",
        )  # fmt: skip
    if not drawn:
        ax.text(0.5, 0.5, "no proxy measured", transform=ax.transAxes, ha="center", color="0.4")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _dpkg_version(package: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
        return out.stdout.strip() or None
    return None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> dict:
    """`python -m bench.gateway_overhead [flags]`: the flags are the fields of `GatewayBenchConfig`."""
    config = GatewayBenchConfig.from_argv(argv, description=__doc__.splitlines()[0])
    # a background job of a script starts with SIGINT ignored: Ctrl-C / kill -INT must still stop us
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        result = run(config)
    except KeyboardInterrupt as e:
        print(f"[gateway_overhead] interrupted ({e or 'Ctrl-C'}); every process it started is stopped", file=sys.stderr)
        raise SystemExit(130) from None
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
