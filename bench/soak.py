"""The reliability benchmark's load: a soak at a steady rate, and a small hostile corpus with
authorization probes, both against a running gateway (`bench.fault_rig.Gateway`).

`soak` sends `rate` chat completions a second (open loop: a request is sent on schedule whether or
not the earlier ones have been answered) for `seconds`, sampling the gateway's resident memory once
a second; it returns every request's time, latency and status and the memory samples, and
`soak_summary` compares the first window (a minute, or a fifth of a short run) with the last.

`probe` sends malformed and hostile requests (`HOSTILE`) and requests without the right key or role
(`AUTHZ`), and counts 5xx answers, answers that are not OpenAI-shaped errors, stalls (no answer
within the timeout) and authorization violations (anything but 401/403/404 where access is denied).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from statistics import median

import httpx

from bench.fault_rig import Gateway, chat, rss_bytes

_CHAT = b'{"model":"base","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'
HOSTILE: list[tuple[str, bytes]] = [
    ("empty body", b""),
    ("not JSON", b"{model: base"),
    ("JSON array", b"[1, 2, 3]"),
    ("JSON null", b"null"),
    ("messages a string", b'{"model":"base","messages":"hi"}'),
    ("messages empty", b'{"model":"base","messages":[]}'),
    ("no model", b'{"messages":[{"role":"user","content":"hi"}]}'),
    ("unknown role", b'{"model":"base","messages":[{"role":"root","content":"hi"}]}'),
    ("content an object", b'{"model":"base","messages":[{"role":"user","content":{"a":1}}]}'),
    ("negative max_tokens", _CHAT[:-1] + b',"max_tokens":-5}'),
    ("huge max_tokens", _CHAT[:-1] + b',"max_tokens":99999999999999999999}'),
    ("NaN temperature", _CHAT[:-1] + b',"temperature":NaN}'),
    ("n of a thousand", _CHAT[:-1] + b',"n":1000}'),
    ("stream a list", _CHAT[:-1] + b',"stream":[1]}'),
    ("NUL bytes", b'{"model":"base","messages":[{"role":"user","content":"a\\u0000b"}]}'),
    ("lone surrogate", b'{"model":"base","messages":[{"role":"user","content":"\\ud800"}]}'),
    ("invalid UTF-8", b'{"model":"base","messages":[{"role":"user","content":"\xff\xfe"}]}'),
    ("deep nesting", _CHAT[:-1] + b',"x":' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("two megabytes", b'{"model":"base","messages":[{"role":"user","content":"' + b"a" * 2_000_000 + b'"}]}'),
    ("many messages", b'{"model":"base","messages":[' + b",".join([b'{"role":"user","content":"x"}'] * 5000) + b"]}"),
    ("long model name", b'{"model":"' + b"m" * 10000 + b'","messages":[{"role":"user","content":"x"}]}'),
]  # fmt: skip
# (method, path, whose key) that must be refused: no key, a wrong key, an app key on reviewer routes
AUTHZ: list[tuple[str, str, str]] = [
    ("POST", "/v1/chat/completions", "none"),
    ("POST", "/v1/chat/completions", "wrong"),
    ("GET", "/v1/models", "none"),
    ("POST", "/v1/review/claim", "app"),
    ("GET", "/v1/review/queue", "app"),
    ("GET", "/v1/review/agreement", "app"),
    ("POST", "/v1/review/items/1/decision", "app"),
    ("GET", "/v1/reviews/00000000-0000-0000-0000-000000000000", "none"),
]


def _openai_error(resp: httpx.Response) -> bool:
    try:
        error = resp.json().get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and bool(error.get("message"))


def probe(gw: Gateway, timeout_s: float = 30.0) -> dict:
    """The hostile corpus and the authorization probes against `gw`; counts and what went wrong."""
    problems: list[str] = []
    server_errors = stalls = unshaped = violations = resets = 0
    with httpx.Client(base_url=gw.url, timeout=timeout_s) as client:
        for name, body in HOSTILE:
            try:  # a connection of its own each: one case's failure cannot spill into the next
                resp = httpx.post(
                    gw.url + "/v1/chat/completions",
                    content=body,
                    headers={**gw.headers, "content-type": "application/json"},
                    timeout=timeout_s,
                )
            except httpx.TimeoutException:
                stalls += 1
                problems.append(f"{name}: no answer within {timeout_s:.0f} s")
                continue
            except httpx.TransportError as err:  # e.g. refused early and the connection closed mid-upload
                resets += 1
                problems.append(f"{name}: no answer, {type(err).__name__}: {err}")
                continue
            if resp.status_code >= 500:
                server_errors += 1
                problems.append(f"{name}: {resp.status_code}")
            elif resp.status_code >= 400 and not _openai_error(resp):
                unshaped += 1
                problems.append(f"{name}: {resp.status_code} without an OpenAI error")
        keys = {"none": {}, "wrong": {"Authorization": "Bearer sk-not-a-key"}, "app": gw.headers}
        for method, path, who in AUTHZ:
            resp = client.request(method, path, headers=keys[who], json={"verdict": "approve"})
            if resp.status_code not in (401, 403, 404):
                violations += 1
                problems.append(f"{method} {path} with {who} key: {resp.status_code}")
    return {
        "hostile_cases": len(HOSTILE),
        "authz_cases": len(AUTHZ),
        "server_errors": server_errors,
        "unshaped_errors": unshaped,
        "stalls": stalls,
        "connection_resets": resets,
        "authz_violations": violations,
        "problems": problems,
    }


def soak(gw: Gateway, seconds: float, rate: float, timeout_s: float = 30.0) -> dict:
    """`rate` requests a second for `seconds`; every request as (sent at s, latency ms, status) and
    the gateway's RSS once a second as (s, bytes). Status 0 is a transport error or a timeout."""
    samples: list[tuple[float, float, int]] = []
    rss: list[tuple[float, int]] = []
    lock = threading.Lock()
    pid = gw.proc.popen.pid
    client = httpx.Client(
        base_url=gw.url, headers=gw.headers, timeout=timeout_s, limits=httpx.Limits(max_connections=256)
    )
    t0 = time.monotonic()

    def one(at: float) -> None:
        start = time.monotonic()
        try:
            status = client.post("/v1/chat/completions", json=chat("What is the answer?")).status_code
        except httpx.HTTPError:
            status = 0
        with lock:
            samples.append((at, 1000 * (time.monotonic() - start), status))

    n = max(1, int(seconds * rate))
    with ThreadPoolExecutor(max_workers=64) as pool:
        next_rss = 0.0
        for i in range(n):
            at = i / rate
            while (now := time.monotonic() - t0) < at:
                time.sleep(min(0.01, at - now))
            if now >= next_rss:
                rss.append((round(now, 2), rss_bytes(pid)))
                next_rss += 1.0
            pool.submit(one, at)
    rss.append((round(time.monotonic() - t0, 2), rss_bytes(pid)))
    client.close()
    return {"requests": sorted(samples), "rss": rss, "seconds": seconds, "rate": rate}


def _p99(latencies: list[float]) -> float | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1)


def soak_summary(run: dict) -> dict:
    """Errors, RSS growth and the p99 of the first and the last window (a minute, or a fifth of a
    shorter run); RSS growth compares the medians of the two windows' samples."""
    seconds, requests, rss = run["seconds"], run["requests"], run["rss"]
    window = min(60.0, seconds / 5)
    first = [ms for at, ms, status in requests if at < window and status == 200]
    last = [ms for at, ms, status in requests if at >= seconds - window and status == 200]
    base = [b for at, b in rss if at <= window and b] or [b for _, b in rss if b]
    end = [b for at, b in rss if at >= seconds - window and b] or [b for _, b in rss if b]
    growth = (median(end) - median(base)) / median(base) if base and end else None
    p99_first, p99_last = _p99(first), _p99(last)
    return {
        "soak_requests": len(requests),
        "soak_errors": sum(1 for *_, status in requests if status != 200),
        "soak_rss_growth": None if growth is None else round(growth, 4),
        "soak_rss_mib_first": round(median(base) / 2**20, 1) if base else None,
        "soak_rss_mib_last": round(median(end) / 2**20, 1) if end else None,
        "soak_p99_ms_first": p99_first,
        "soak_p99_ms_last": p99_last,
        "soak_p99_ratio": round(p99_last / p99_first, 3) if p99_first and p99_last else None,
        "soak_window_s": round(window, 1),
    }
