"""Gateway overhead, the machinery: the processes it starts, hey's constant-rate runs, one target
measured at every rate.

`Processes` starts each server in its own process group (its output in a log file) and stops them
all, in reverse order, whatever happens. `run_load` drives one rate with Debian's `hey` (optionally
spread over staggered hey processes); `measure_target` runs every rate against one target and
records, beside hey's numbers, the CPU the proxy, the mock, hey and everybody else used meanwhile,
so that a contended measurement shows. It only ever sends traffic to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.gateway_config import ROOT, GatewayBenchConfig
from bench.gateway_stats import (
    FOREIGN_WARN_CORES,
    HeyRow,
    parse_hey_csv,
    rate_key,
    split_rate,
    split_workers,
    summarize,
)

HOST = "127.0.0.1"
CRASH_GRACE_S = 20.0  # a server that has logged a traceback and still does not answer after this has failed


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------


@dataclass
class Proc:
    """A process started in its own session (process group), with its output in a log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    pgid: int = field(init=False)
    seen_pids: set[int] = field(default_factory=set)  # every process of the group seen: restarts show

    def __post_init__(self) -> None:
        self.pgid = self.popen.pid  # start_new_session: the leader's pid is the group id

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the live processes in the group, from /proc."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == self.pgid:  # field 5 (pgrp), counted from the state
                total += int(fields[11]) + int(fields[12])  # utime, stime
                self.seen_pids.add(int(entry))
        return total / tick

    def stop(self, timeout_s: float = 10.0) -> None:
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, sig)
            try:
                self.popen.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            # the leader is gone; make sure nothing else of the group lingers
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signal.SIGKILL)
            return


class Processes:
    """Everything the benchmark started; stopped in reverse order, whatever happens."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it; closed after it exits
        try:
            popen = subprocess.Popen(
                cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        while self.procs:
            self.stop(self.procs[-1])


@dataclass(frozen=True)
class Target:
    """Where one target answers: its name, base URL, API key and model (and its process, but for
    `direct`)."""

    name: str
    base: str
    key: str
    model: str
    proc: Proc | None = None


def http(method: str, url: str, body: dict | None = None, key: str | None = None, timeout: float = 5.0):
    """(status, parsed JSON or text) of one request; (0, error) if it could not be made."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    except (OSError, ValueError) as e:
        return 0, str(e)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_ready(proc: Proc | None, base: str, paths: list[str], key: str | None, timeout_s: float) -> str:
    """Wait for a 200 on any of `paths`; returns the path that answered. Raises if the process
    exits or the time runs out."""
    started = time.monotonic()
    deadline = started + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {proc.log_tail()}")
        if proc is not None and time.monotonic() - started > CRASH_GRACE_S and "Traceback" in proc.log_tail(20000):
            # a supervisor that restarts crashing workers never exits: don't wait out the whole timeout
            raise RuntimeError(f"{proc.name} is not answering and logged a traceback: {proc.log_tail()}")
        for path in paths:
            status, body = http("GET", base + path, key=key, timeout=2.0)
            if status == 200:
                return path
            last = f"GET {path}: {status} {str(body)[:200]}"
        time.sleep(0.5)
    tail = proc.log_tail() if proc is not None else ""
    raise RuntimeError(f"not ready after {timeout_s:.0f}s ({last}); log tail: {tail}")


def request_body(model: str) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "What is the standing charge of tariff NW-E7-2024?"}],
        "max_tokens": 16,
        "temperature": 0,
    }


def check_chat(base: str, model: str, key: str) -> None:
    status, body = http("POST", base + "/v1/chat/completions", request_body(model), key=key, timeout=30.0)
    if status != 200 or not isinstance(body, dict) or "choices" not in body:
        raise RuntimeError(f"POST /v1/chat/completions -> {status}: {str(body)[:500]}")


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------


def hey_command(hey: str, url: str, key: str, body: str, duration_s: float, workers: int, qps: float) -> list[str]:
    return [
        hey, "-z", f"{duration_s:g}s", "-q", f"{qps:.6g}", "-c", str(workers), "-m", "POST",
        "-T", "application/json", "-H", f"Authorization: Bearer {key}", "-d", body, "-o", "csv", url,
    ]  # fmt: skip


def run_load(
    hey: str, url: str, key: str, model: str, rate: float, duration_s: float, delay_s: float,
    procs: int, log_dir: Path,
) -> dict:  # fmt: skip
    """One constant-rate run; returns its summary and hey's settings.

    hey starts every worker's ticker at the same instant, so one hey process sends its `workers`
    requests in a burst every 1/qps s. With `procs` > 1 the workers are spread over that many hey
    processes started 1/(qps*procs) s apart: smaller bursts, more often, the same rate.
    """
    workers, qps = split_rate(rate, delay_s)
    parts = split_workers(workers, procs)
    body = json.dumps(request_body(model), separators=(",", ":"))
    interval = 1.0 / qps
    started: list[tuple[subprocess.Popen, float, Path, list[str]]] = []
    rows: list[HeyRow] = []
    try:
        t0 = time.monotonic()
        for i, w in enumerate(parts):
            shift = i * interval / len(parts)
            while time.monotonic() - t0 < shift:
                time.sleep(min(0.001, shift - (time.monotonic() - t0)))
            out = log_dir / f"hey-{rate:g}-{i}.csv"
            cmd = hey_command(hey, url, key, body, duration_s, w, qps)
            with open(out, "wb") as f:
                p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.PIPE, start_new_session=True)
            started.append((p, shift, out, cmd))
        errors = []
        for p, shift, out, _ in started:
            _, err = p.communicate(timeout=duration_s + 60)
            if p.returncode != 0:
                errors.append(f"hey exited {p.returncode}: {err.decode(errors='replace')[-300:]}")
            rows.extend(parse_hey_csv(out.read_text(errors="replace"), offset_shift_s=shift))
    finally:
        for p, *_ in started:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    # each worker ticks every 1/qps s until the end (a tick it was already waiting for may add one more)
    scheduled = sum(w * math.floor(duration_s * qps + 1e-9) for w in parts)
    stats = summarize(rows, rate, duration_s, scheduled)
    stats.update({"hey_workers": workers, "hey_qps_per_worker": round(qps, 4), "hey_procs": len(parts)})
    if errors:
        stats["hey_errors"] = errors
    return stats


# ----------------------------------------------------------------------------------------------
# Measuring a target
# ----------------------------------------------------------------------------------------------


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def children_cpu_s() -> float:
    """CPU seconds of this process's finished, waited-for children (the hey runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_quiet(max_wait_s: float, threshold_cores: float, own: list[Proc], stderr) -> float:
    """Wait (at most `max_wait_s`) until processes that are not ours use under `threshold_cores`
    over a 1 s window; returns the last foreign load seen (cores)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0, own0, t0 = machine_busy_s(), sum(p.cpu_seconds() for p in own), time.monotonic()
        time.sleep(1.0)
        wall = time.monotonic() - t0
        foreign = max(0.0, (machine_busy_s() - busy0) - (sum(p.cpu_seconds() for p in own) - own0)) / wall
        if foreign < threshold_cores or time.monotonic() >= deadline:
            return foreign
        print(f"[gateway_overhead] waiting for a quiet machine: others use {foreign:.2f} cores", file=stderr)


def measure_target(
    target: Target, own: list[Proc], rates, config: GatewayBenchConfig, log_dir: Path, stderr
) -> dict[float, dict]:
    """Every rate against `target` (after a check request and an unmeasured warm-up); stops early
    if the target's process dies. `own` are the benchmark's processes (the mock first): the CPU of
    all others is reported as `foreign_cpu_cores`."""
    proc, model, key = target.proc, target.model, target.key
    url = target.base + "/v1/chat/completions"
    delay_s = config.delay_ms / 1000
    check_chat(target.base, model, key)
    if config.warmup > 0:  # first requests pay for imports, connection pools, caches: not measured
        run_load(config.hey, url, key, model, min(rates), config.warmup, delay_s, 1, log_dir)
    per_rate: dict = {}
    for rate in rates:
        idle_foreign = wait_quiet(config.quiet_wait, config.quiet_cores, own, stderr) if config.quiet_wait > 0 else None
        proxy0 = proc.cpu_seconds() if proc is not None else 0.0
        own0s = [p.cpu_seconds() for p in own]
        own0 = sum(own0s)
        busy0, hey0, t0 = machine_busy_s(), children_cpu_s(), time.monotonic()
        stats = run_load(config.hey, url, key, model, rate, config.duration, delay_s, config.hey_procs, log_dir)
        wall = time.monotonic() - t0
        busy = machine_busy_s() - busy0
        hey_cpu = children_cpu_s() - hey0
        own1s = [p.cpu_seconds() for p in own]
        own_cpu = sum(own1s) - own0
        mock_cpu = own1s[0] - own0s[0]  # own[0] is the mock upstream: a yardstick of this machine's speed
        stats["mock_cpu_ms_per_request"] = round(1000 * mock_cpu / stats["requests"], 3) if stats["requests"] else None
        if proc is not None:
            cpu = proc.cpu_seconds() - proxy0
            stats["proxy_cpu_s"] = round(cpu, 2)
            stats["proxy_cpu_ms_per_request"] = round(1000 * cpu / stats["requests"], 3) if stats["requests"] else None
            if not proc.alive():
                stats["died"] = f"exited {proc.popen.returncode}: {proc.log_tail(500)}"
        stats["hey_cpu_s"] = round(hey_cpu, 2)
        stats["machine_busy_cores"] = round(busy / wall, 2)
        # CPU that neither the proxy, the mock nor hey used while this rate ran: other people's work
        stats["foreign_cpu_cores"] = round(max(0.0, busy - own_cpu - hey_cpu) / wall, 2)
        if idle_foreign is not None:
            stats["foreign_cpu_cores_before"] = round(idle_foreign, 2)
        per_rate[rate] = stats
        print(
            f"[gateway_overhead] {target.name:8s} {rate:>5g} rps: p50 {stats['p50_ms']} ms, p99 {stats['p99_ms']} ms, "
            f"{stats['achieved_rps']} rps, errors {stats['error_rate']:.2%}, others {stats['foreign_cpu_cores']} cores",
            file=stderr, flush=True,
        )  # fmt: skip
        if proc is not None and not proc.alive():
            break
        time.sleep(config.pause)
    return per_rate


def remeasure_direct(result: dict, mock: Proc, mock_url: str, config: GatewayBenchConfig, log_dir: Path, stderr):
    """The baseline is cheap: measure again, at the end, each rate that other processes disturbed
    (the mock is still up) and keep the quieter of the two measurements."""
    direct = result["targets"].get("direct", {}).get("rates")
    if not direct:
        return
    noisy = [r for r in config.rates if direct.get(rate_key(r), {}).get("foreign_cpu_cores", 0.0) > FOREIGN_WARN_CORES]
    if not noisy:
        return
    again = dataclasses.replace(config, warmup=0.0)
    redo = measure_target(Target("direct", mock_url, "sk-mock", config.model), [mock], noisy, again, log_dir, stderr)
    for rate, stats in redo.items():
        first = direct[rate_key(rate)]
        if stats["foreign_cpu_cores"] < first["foreign_cpu_cores"]:
            direct[rate_key(rate)] = {**stats, "remeasured": True, "first_attempt": first}
        else:
            first["remeasured"] = False
