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
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "out" / "gateway"
HOST = "127.0.0.1"
DEFAULT_RATES = (25, 50, 100, 200, 400)
ALL_TARGETS = ("direct", "litellm", "ours")
PROXIES = ("litellm", "ours")
P99_BUDGET_MS = 50.0  # a proxy "sustains" a rate only while its p99 added latency stays under this
MAX_ERROR_RATE = 0.01
CRASH_GRACE_S = 20.0  # a server that has logged a traceback and still does not answer after this has failed
FOREIGN_WARN_CORES = 0.25  # CPU used by processes that are not the benchmark's, above which results are suspect
MIN_ACHIEVED_FRACTION = 0.95
WORKER_MARGIN_S = 0.1  # headroom per worker beyond the upstream delay, so the delay never throttles hey
MODEL = "mock"
UPSTREAM_MODELS = "mock,base"  # what the mock lists in /v1/models (tunegate's base model is `base`)
OURS_ENV = {
    # measure the gateway's overhead, not its per-key limiter: lift the default limits
    "TUNEGATE_GATEWAY__REQUESTS_PER_MINUTE": "100000000",
    "TUNEGATE_GATEWAY__TOKENS_PER_MINUTE": "100000000000",
    # the comparison is proxy against proxy: guardrails off (authentication, logging, metrics stay on)
    "TUNEGATE_GUARDRAILS__ENABLED": "false",
}
LITELLM_SETTINGS = {
    "litellm_settings": {"drop_params": True, "set_verbose": False, "json_logs": True, "request_timeout": 600},
    "general_settings": {
        "disable_spend_logs": True,
        "disable_error_logs": True,
        "allow_requests_on_db_unavailable": True,
    },
}
LITELLM_ENV = {
    "LITELLM_LOG": "ERROR",
    # no network here: use the model cost map that ships in the package instead of fetching it
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}
LITELLM_MASTER_KEY = "sk-bench-gateway-overhead"


# ----------------------------------------------------------------------------------------------
# Pure parts: the load split, hey's CSV, statistics, added latency, max_rps (tested without servers)
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


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
# Targets
# ----------------------------------------------------------------------------------------------


def litellm_version(litellm_bin: str) -> str | None:
    python = Path(litellm_bin).parent / "python"
    if not python.exists():
        return None
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return out.stdout.strip() or None


def find_litellm(explicit: str | None) -> str | None:
    candidates = (explicit, os.environ.get("LITELLM_BIN"), str(ROOT / ".venv-litellm" / "bin" / "litellm"),
                  str(ROOT / ".venv" / "bin" / "litellm"))  # fmt: skip
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    return shutil.which("litellm")


def litellm_config(mock_url: str, model: str) -> dict:
    return {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {"model": f"openai/{model}", "api_base": f"{mock_url}/v1", "api_key": "sk-mock"},
            }
        ],
        "litellm_settings": dict(LITELLM_SETTINGS["litellm_settings"]),
        "general_settings": {"master_key": LITELLM_MASTER_KEY, **LITELLM_SETTINGS["general_settings"]},
    }


def start_litellm(procs: Processes, tmp: Path, mock_url: str, args, info: dict) -> tuple[Proc, str, str, str]:
    """(process, base url, key, model) of a started, answering LiteLLM proxy; `info` gets what was
    used (filled in as it goes, so that a failure still tells). A proxy that fails is stopped."""
    litellm_bin = find_litellm(args.litellm_bin)
    if litellm_bin is None:
        raise RuntimeError("no `litellm` found: pip install 'litellm[proxy]', or pass --litellm-bin")
    config = litellm_config(mock_url, args.model)
    config_path = tmp / "litellm.yaml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    port = free_port()
    cmd = [
        litellm_bin, "--config", str(config_path), "--host", HOST, "--port", str(port),
        "--num_workers", str(args.litellm_workers),
    ]  # fmt: skip
    info.update(
        {
            "version": litellm_version(litellm_bin),
            "command": cmd,
            "config": {**config, "general_settings": {**config["general_settings"], "master_key": "sk-…"}},
            "env": dict(LITELLM_ENV),
            "num_workers": args.litellm_workers,
            "database": None,
        }
    )
    proc = procs.start("litellm", cmd, env=LITELLM_ENV)
    base = f"http://{HOST}:{port}"
    try:
        info["ready_path"] = wait_ready(
            proc, base, ["/health/liveliness", "/v1/models"], LITELLM_MASTER_KEY, args.start_timeout
        )
    except BaseException:
        procs.stop(proc)
        raise
    return proc, base, LITELLM_MASTER_KEY, args.model


def _json_with_key(text: str) -> dict | None:
    """The JSON object with a `key` field in a command's output (log lines around it tolerated)."""
    with contextlib.suppress(ValueError):
        obj = json.loads(text)
        if isinstance(obj, dict) and "key" in obj:
            return obj
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and "key" in obj:
                    return obj
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        with contextlib.suppress(ValueError):
            obj = json.loads(text[start : end + 1])
            if isinstance(obj, dict) and "key" in obj:
                return obj
    return None


def start_ours(procs: Processes, tmp: Path, mock_url: str, args, info: dict) -> tuple[Proc, str, str, str]:
    """(process, base url, key, model) of a started, answering tunegate gateway; `info` gets what
    was used (filled in as it goes, so that a failure still tells). A gateway that fails is stopped."""
    port = free_port()
    var_dir = tmp / "tunegate-var"
    var_dir.mkdir(exist_ok=True)
    env = {"TUNEGATE_VAR_DIR": str(var_dir), **OURS_ENV}
    if args.ours_workers:
        env["TUNEGATE_GATEWAY__WORKERS"] = str(args.ours_workers)
    for item in args.ours_env or []:
        name, _, value = item.partition("=")
        env[name] = value
    fmt = {"MOCK_URL": mock_url, "PORT": str(port), "HOST": HOST}
    template = args.ours_cmd or [
        str(ROOT / ".venv" / "bin" / "tunegate"), "serve", "--vllm-url", "{MOCK_URL}", "--port", "{PORT}",
        "--no-workers",
    ]  # fmt: skip
    cmd = [part.format(**fmt) for part in template]
    tunegate = str(ROOT / ".venv" / "bin" / "tunegate")
    key_cmd = args.ours_key_cmd or [tunegate, "keys", "create", "bench", "--role", "app", "--json"]
    info.update({"command": cmd, "key_command": key_cmd, "env": {**env, "TUNEGATE_VAR_DIR": "<tmp>"}})
    full_env = {**os.environ, **env}
    if args.ours_migrate:
        migrate = [tunegate, "db", "upgrade"]
        done = subprocess.run(migrate, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=180)
        info["migrate"] = {"command": migrate, "rc": done.returncode}
    made = subprocess.run(key_cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=180)
    obj = _json_with_key(made.stdout)
    if made.returncode != 0 or obj is None:
        raise RuntimeError(
            f"`{' '.join(key_cmd)}` exited {made.returncode} without a key: "
            f"{(made.stdout + made.stderr).strip()[-800:]}"
        )
    key = str(obj["key"])
    proc = procs.start("ours", cmd, env=env)
    base = f"http://{HOST}:{port}"
    try:
        info["ready_path"] = wait_ready(proc, base, ["/readyz", "/v1/models"], key, args.start_timeout)
        model = args.ours_model
        if not model:
            status, body = http("GET", base + "/v1/models", key=key)
            ids = [m.get("id") for m in body.get("data", [])] if status == 200 and isinstance(body, dict) else []
            model = ids[0] if ids else "base"
    except BaseException:
        procs.stop(proc)
        raise
    info["model"] = model
    return proc, base, key, model


# ----------------------------------------------------------------------------------------------
# The run
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


def _measure_target(name, base, key, model, proc, own, rates, args, log_dir, stderr) -> dict:
    url = base + "/v1/chat/completions"
    check_chat(base, model, key)
    if args.warmup > 0:  # first requests pay for imports, connection pools, caches: not measured
        run_load(args.hey, url, key, model, min(rates), args.warmup, args.delay_ms / 1000, 1, log_dir)
    per_rate: dict = {}
    for rate in rates:
        idle_foreign = wait_quiet(args.quiet_wait, args.quiet_cores, own, stderr) if args.quiet_wait > 0 else None
        proxy0 = proc.cpu_seconds() if proc is not None else 0.0
        own0s = [p.cpu_seconds() for p in own]
        own0 = sum(own0s)
        busy0, hey0, t0 = machine_busy_s(), children_cpu_s(), time.monotonic()
        stats = run_load(args.hey, url, key, model, rate, args.duration, args.delay_ms / 1000,
                         args.hey_procs, log_dir)  # fmt: skip
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
            f"[gateway_overhead] {name:8s} {rate:>5g} rps: p50 {stats['p50_ms']} ms, p99 {stats['p99_ms']} ms, "
            f"{stats['achieved_rps']} rps, errors {stats['error_rate']:.2%}, others {stats['foreign_cpu_cores']} cores",
            file=stderr, flush=True,
        )  # fmt: skip
        if proc is not None and not proc.alive():
            break
        time.sleep(args.pause)
    return per_rate


def _remeasure_direct(result: dict, mock: Proc, mock_url: str, model: str, rates, args, log_dir, stderr) -> None:
    """The baseline is cheap: measure again, at the end, each rate that other processes disturbed
    (the mock is still up) and keep the quieter of the two measurements."""
    direct = result["targets"].get("direct", {}).get("rates")
    if not direct:
        return
    noisy = [r for r in rates if direct.get(_key(r), {}).get("foreign_cpu_cores", 0.0) > FOREIGN_WARN_CORES]
    if not noisy:
        return
    again = argparse.Namespace(**{**vars(args), "warmup": 0.0})
    redo = _measure_target("direct", mock_url, "sk-mock", model, None, [mock], noisy, again, log_dir, stderr)
    for rate, stats in redo.items():
        first = direct[_key(rate)]
        if stats["foreign_cpu_cores"] < first["foreign_cpu_cores"]:
            direct[_key(rate)] = {**stats, "remeasured": True, "first_attempt": first}
        else:
            first["remeasured"] = False


def _key(rate: float) -> str:
    return f"{rate:g}"


def run(
    rates: tuple[float, ...] = DEFAULT_RATES,
    duration_s: float = 8.0,
    delay_ms: float = 50.0,
    targets: tuple[str, ...] = ALL_TARGETS,
    out_dir: Path | str = DEFAULT_OUT,
    litellm_bin: str | None = None,
    litellm_workers: int = 2,
    ours_cmd: list[str] | None = None,
    ours_key_cmd: list[str] | None = None,
    ours_env: list[str] | None = None,
    ours_workers: int | None = 2,
    ours_model: str | None = None,
    ours_migrate: bool = True,
    mock_workers: int = 2,
    hey: str = "hey",
    hey_procs: int = 1,
    warmup_s: float = 2.0,
    pause_s: float = 1.0,
    quiet_wait_s: float = 0.0,
    quiet_cores: float = 0.25,
    start_timeout_s: float = 120.0,
    model: str = MODEL,
    plot: bool = True,
    stderr=sys.stderr,
) -> dict:
    """Measure the targets at every rate; returns (and writes) the result as a dict."""
    args = argparse.Namespace(
        duration=duration_s, delay_ms=delay_ms, litellm_bin=litellm_bin, litellm_workers=litellm_workers,
        ours_cmd=ours_cmd, ours_key_cmd=ours_key_cmd, ours_env=ours_env, ours_workers=ours_workers,
        ours_model=ours_model, ours_migrate=ours_migrate, hey=hey, hey_procs=hey_procs, warmup=warmup_s,
        pause=pause_s, start_timeout=start_timeout_s, model=model, quiet_wait=quiet_wait_s,
        quiet_cores=quiet_cores,
    )  # fmt: skip
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; choose from {', '.join(ALL_TARGETS)}")
    hey_path = shutil.which(hey)
    if hey_path is None:
        raise RuntimeError(f"`{hey}` not found: apt-get install -y hey")
    args.hey = hey_path
    rates = tuple(sorted(rates))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result: dict = {
        "benchmark": "gateway_overhead",
        "config": {
            "rates_rps": list(rates),
            "duration_s": duration_s,
            "upstream_delay_ms": delay_ms,
            "cpu_count": os.cpu_count(),
            "hey": hey_path,
            "hey_version": _dpkg_version("hey"),
            "hey_procs": hey_procs,
            "hey_split": {
                _key(r): dict(zip(("workers", "qps_per_worker"), split_rate(r, delay_ms / 1000), strict=True))
                for r in rates
            },  # fmt: skip
            "warmup_s": warmup_s,
            "quiet_wait_s": quiet_wait_s,
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
            "mock_upstream": {"workers": mock_workers, "server": "uvicorn + raw ASGI (bench/mock_upstream.py)"},
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
            "--delay-ms", f"{delay_ms:g}", "--workers", str(mock_workers), "--models", f"{model},base",
        ]  # fmt: skip
        mock = procs.start("mock", mock_cmd)
        wait_ready(mock, mock_url, ["/v1/models"], None, 60)
        for name in targets:
            entry: dict = {}
            result["targets"][name] = entry
            proc = None
            try:
                if name == "direct":
                    base, key, target_model = mock_url, "sk-mock", model
                elif name == "litellm":
                    entry["setup"] = {}
                    proc, base, key, target_model = start_litellm(procs, tmp, mock_url, args, entry["setup"])
                else:
                    entry["setup"] = {}
                    proc, base, key, target_model = start_ours(procs, tmp, mock_url, args, entry["setup"])
                own = [mock] + ([proc] if proc is not None else [])
                per_rate = _measure_target(name, base, key, target_model, proc, own, rates, args, tmp, stderr)
                entry["rates"] = {_key(r): s for r, s in per_rate.items()}
                if proc is not None:
                    entry["processes_seen"] = len(proc.seen_pids)
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
                entry["error"] = f"{type(e).__name__}: {e}"[:3000]
                print(f"[gateway_overhead] {name}: {entry['error'][:400]}", file=stderr, flush=True)
            finally:
                if proc is not None:
                    procs.stop(proc)
        try:
            _remeasure_direct(result, mock, mock_url, model, rates, args, tmp, stderr)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
            result["targets"]["direct"]["remeasure_error"] = f"{type(e).__name__}: {e}"[:1000]
    finally:
        procs.stop_all()
        if os.environ.get("GWBENCH_KEEP_TMP"):
            print(f"[gateway_overhead] logs kept in {tmp}", file=stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    finish(result, out_dir, plot)
    result["wall_s"] = round(time.monotonic() - started, 1)
    (out_dir / "gateway_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated: direct,litellm,ours")
    parser.add_argument("--rates", default=",".join(str(r) for r in DEFAULT_RATES), help="requests/s, comma-separated")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per rate")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="the mock upstream's fixed delay")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the JSON and the plot")
    parser.add_argument("--litellm-bin", default=None, help="the `litellm` CLI (default: $LITELLM_BIN, .venv, PATH)")
    parser.add_argument("--litellm-workers", type=int, default=2, help="LiteLLM --num_workers (one per core)")
    parser.add_argument(
        "--ours-cmd", default=None,
        help="JSON list: the command that starts tunegate's gateway; {MOCK_URL} and {PORT} are filled in",
    )  # fmt: skip
    parser.add_argument("--ours-key-cmd", default=None, help="JSON list: prints a JSON object with `key`")
    parser.add_argument("--ours-env", action="append", default=[], help="NAME=VALUE for tunegate (repeatable)")
    parser.add_argument("--ours-workers", type=int, default=2, help="TUNEGATE_GATEWAY__WORKERS (0: leave unset)")
    parser.add_argument("--ours-model", default=None, help="model name for ours (default: first of /v1/models)")
    parser.add_argument("--no-ours-migrate", action="store_true", help="skip `tunegate db upgrade` first")
    parser.add_argument("--mock-workers", type=int, default=2)
    parser.add_argument("--hey", default="hey")
    parser.add_argument(
        "--hey-procs", type=int, default=1,
        help="spread each rate's workers over N hey processes started 1/(qps*N) s apart (smaller bursts)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of load per target")
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument(
        "--quiet-wait", type=float, default=0.0,
        help="before each rate, wait up to this many seconds for other processes to go quiet",
    )  # fmt: skip
    parser.add_argument("--quiet-cores", type=float, default=0.25, help="'quiet': others use fewer cores")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    # a background job of a script starts with SIGINT ignored: Ctrl-C / kill -INT must still stop us
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        result = run(
            rates=tuple(float(r) for r in args.rates.split(",") if r.strip()),
            duration_s=args.duration,
            delay_ms=args.delay_ms,
            targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
            out_dir=args.out,
            litellm_bin=args.litellm_bin,
            litellm_workers=args.litellm_workers,
            ours_cmd=json.loads(args.ours_cmd) if args.ours_cmd else None,
            ours_key_cmd=json.loads(args.ours_key_cmd) if args.ours_key_cmd else None,
            ours_env=args.ours_env,
            ours_workers=args.ours_workers or None,
            ours_model=args.ours_model,
            ours_migrate=not args.no_ours_migrate,
            mock_workers=args.mock_workers,
            hey=args.hey,
            hey_procs=args.hey_procs,
            warmup_s=args.warmup,
            start_timeout_s=args.start_timeout,
            quiet_wait_s=args.quiet_wait,
            quiet_cores=args.quiet_cores,
            plot=not args.no_plot,
        )
    except KeyboardInterrupt as e:
        print(f"[gateway_overhead] interrupted ({e or 'Ctrl-C'}); every process it started is stopped", file=sys.stderr)
        raise SystemExit(130) from None
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
