"""The faults of the reliability benchmark, each one a function that breaks something on purpose and
says what survived: `{"survived": True, ...}`, or `{"survived": False, "failed": [what went wrong]}`.

* `vllm_faults`      vLLM killed mid-request and mid-stream, stalled mid-request and mid-stream,
                     restarted: clear errors, recovery without restarting the gateway, every
                     accepted request in the traffic log
* `postgres_outage`  PostgreSQL unreachable (a TCP proxy in front of it is killed) under load:
                     requests still served or refused clearly, every answered request logged after
* `review_outage`    a reviewer decides while PostgreSQL is unreachable: a clear 503, the retried
                     decision lands once it is back, none accepted before is lost
* `worker_lease`     a worker SIGKILLed while it holds a job's lease: another claims it after the
                     lease expires, the job is done once, the dead worker's claim is void
* `registry_enospc`  the disk fills (ENOSPC) while an adapter is published: no half adapter visible,
                     the next publish works
* `orphan_vllm`      the process that started vLLM is SIGKILLed: vLLM (a stand-in command) goes too
* `gateway_killed`   the gateway SIGKILLed under load: how many answered requests' rows, still queued
                     in its memory, never reach the traffic log

Imports `bench`, `core` and `training` (the registry).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.fault_rig import HOST, Gateway, chat, make_key, proxied_postgres, start_gateway, start_upstream
from bench.gateway_harness import Processes
from core.io import free_port


def _wait(predicate: Callable[[], bool], timeout_s: float, every_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return predicate()


def _outcome(failed: list[str], **details) -> dict:
    return {"survived": not failed, **({"failed": failed} if failed else {}), **details}


def _clear_error(resp: httpx.Response, statuses: tuple[int, ...]) -> str | None:
    """None when `resp` is one of `statuses` with an OpenAI-shaped error; else what it was instead."""
    try:
        error = resp.json().get("error", {})
    except ValueError:
        error = {}
    if resp.status_code in statuses and error.get("message"):
        return None
    return f"{resp.status_code} {resp.text[:200]}"


def _stream_error(gw, content: str, during: Callable[[], None] | None = None, statuses=(502, 503, 504)) -> str | None:
    """Stream `content` (calling `during` once the answer has begun); None when the client was told
    clearly that it failed: an error status with an OpenAI error (a buffered stream), or an error
    event in the stream. Else what it got instead."""
    events: list[dict] = []
    if during is not None:  # a buffered stream sends nothing before the end: give it time to begin
        threading.Timer(0.5, during).start()
    try:
        with httpx.stream(
            "POST", gw.url + "/v1/chat/completions", json=chat(content, True), headers=gw.headers, timeout=30
        ) as resp:
            if resp.status_code != 200:
                resp.read()
                return _clear_error(resp, statuses)
            for line in resp.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
    except httpx.HTTPError as err:
        return f"the stream was cut without an error event after {len(events)} events ({type(err).__name__})"
    if any("error" in e for e in events):
        return None
    return f"the stream ended normally, without an error event, after {len(events)} events"


def vllm_faults(work: Path, guardrails: bool = True) -> dict:
    """vLLM killed and stalled, mid-request and mid-stream, then back: see the module docstring."""
    failed: list[str] = []
    procs = Processes(work)
    port = free_port()
    sent = 0
    try:
        upstream = start_upstream(procs, port)
        gw = start_gateway(
            procs, work / "var", f"http://{HOST}:{port}", guardrails=guardrails,
            gateway={"upstream_timeout_s": 2, "breaker_failures": 100, "connect_retries": 0},
        )  # fmt: skip

        def kill_upstream() -> None:
            os.killpg(upstream.pgid, signal.SIGKILL)
            upstream.popen.wait()

        def restart() -> None:
            nonlocal upstream
            procs.stop(upstream)
            upstream = start_upstream(procs, port)

        sent += 1
        if (r := gw.post(chat("hello"))).status_code != 200:
            failed.append(f"first request: {r.status_code}")
        # killed mid-request
        threading.Timer(0.5, kill_upstream).start()
        sent += 1
        if problem := _clear_error(gw.post(chat("slow")), (502, 503)):
            failed.append(f"vLLM killed mid-request: {problem}")
        restart()
        sent += 1
        if (r := gw.post(chat("hello"))).status_code != 200:
            failed.append(f"after vLLM came back: {r.status_code} {r.text[:200]}")
        # killed mid-stream
        sent += 1
        if problem := _stream_error(gw, "slow", kill_upstream):
            failed.append(f"vLLM killed mid-stream: {problem}")
        restart()
        # stalled mid-request and mid-stream (the upstream timeout is 2 s)
        sent += 1
        if problem := _clear_error(gw.post(chat("stall")), (504,)):
            failed.append(f"vLLM stalled mid-request: {problem}")
        sent += 1
        if problem := _stream_error(gw, "stall"):
            failed.append(f"vLLM stalled mid-stream: {problem}")
        sent += 1
        if (r := gw.post(chat("hello"))).status_code != 200:
            failed.append(f"after the stalls: {r.status_code} {r.text[:200]}")
        _wait(lambda: len(gw.logged()) >= sent, 15)
        logged = sorted(gw.logged())
        if len(logged) < sent:
            failed.append(f"traffic log holds {len(logged)} of {sent} requests")
    except Exception as err:  # the rig itself broke: say so, as a failure of this fault
        failed.append(f"{type(err).__name__}: {err}")
        logged = []
    finally:
        procs.stop_all()
    return _outcome(failed, requests=sent, logged_statuses=logged, lost_records=max(0, sent - len(logged)))


def postgres_outage(
    work: Path, outage_s: float = 30.0, rate: float = 10.0, db_url: str | None = None, guardrails: bool = True
) -> dict:
    """PostgreSQL unreachable for `outage_s` under `rate` requests/s: see the module docstring. The
    database is `db_url`, or one made for the run on a local server."""
    failed: list[str] = []
    statuses: list[int] = []
    unclear: list[str] = []
    lost: int | None = None
    procs = Processes(work)
    try:
        with proxied_postgres(db_url) as (proxy, direct, via_proxy):
            port = free_port()
            start_upstream(procs, port)
            gw = start_gateway(
                procs, work / "var", f"http://{HOST}:{port}", db_url=via_proxy, key_db_url=direct,
                guardrails=guardrails,
            )  # fmt: skip
            stop = threading.Event()

            def load() -> None:
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        r = gw.post(chat("hello"), timeout=60)
                        statuses.append(r.status_code)
                        if r.status_code != 200 and (problem := _clear_error(r, (503,))):
                            unclear.append(problem)
                    except httpx.HTTPError as err:
                        statuses.append(0)
                        unclear.append(f"{type(err).__name__}: {err}")
                    time.sleep(max(0.0, 1 / rate - (time.monotonic() - t0)))

            loader = threading.Thread(target=load, daemon=True)
            loader.start()
            time.sleep(1.0)
            proxy.down()
            time.sleep(outage_s)
            proxy.up()
            time.sleep(2.0)
            stop.set()
            loader.join(90)
            answered = statuses.count(200)
            reader = Gateway(gw.url, gw.key, direct, gw.proc)
            _wait(lambda: reader.logged().count(200) >= answered, 60, 0.5)
            logged = reader.logged().count(200)
            if logged < answered:
                failed.append(f"traffic log holds {logged} of {answered} answered requests")
            lost = max(0, answered - logged)
            if gw.post(chat("hello")).status_code != 200:
                failed.append("no recovery after the database came back")
            if unclear:
                failed.append(f"{len(unclear)} unclear errors, e.g. {unclear[0]}")
            if not gw.proc.alive():
                failed.append("the gateway exited")
    except Exception as err:
        failed.append(f"{type(err).__name__}: {err}")
    finally:
        procs.stop_all()
    return _outcome(
        failed, outage_s=outage_s, requests=len(statuses), answered=statuses.count(200),
        refused_503=statuses.count(503), lost_records=lost,
    )  # fmt: skip


_WORKER = """
import sys, time
from core.db import claim, make_engine, session_factory, session_scope
sessions = session_factory(make_engine(sys.argv[1]))
with session_scope(sessions) as session:
    job = claim(session, "doomed-worker", lease_s=float(sys.argv[2]))
    job_id = job.id if job else "none"
print(job_id, flush=True)  # committed: the claim is visible
time.sleep(3600)
"""


def worker_lease(work: Path, db_url: str | None = None, lease_s: float = 1.0) -> dict:
    """A worker SIGKILLed while holding a lease; the job is claimed again and done once."""
    from core.db import Job, LeaseLost, claim, complete, enqueue, make_engine, session_factory, session_scope, upgrade
    from core.db.models import utcnow

    failed: list[str] = []
    work.mkdir(parents=True, exist_ok=True)
    db_url = db_url or f"sqlite:///{work / 'jobs.db'}"
    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    with session_scope(sessions) as session:
        job_id = enqueue(session, "fault", {"n": 1}).id
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, db_url, str(lease_s)], stdout=subprocess.PIPE, text=True)
    try:
        claimed = (worker.stdout.readline() if worker.stdout else "").strip()
        if claimed != str(job_id):
            failed.append(f"the doomed worker claimed {claimed!r}, not job {job_id}")
        with session_scope(sessions) as session:
            stale = session.get(Job, job_id)
            session.expunge(stale)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        taken: list = []

        def reclaim() -> bool:
            with session_scope(sessions) as session:
                before = utcnow()
                job = claim(session, "survivor", lease_s=60)
                if job is not None:
                    if before < stale.lease_expires_at:
                        failed.append("the job was claimed again while its lease still ran")
                    complete(session, job, {"done_by": "survivor"})
                    taken.append(job.attempts)
            return bool(taken)

        if not _wait(reclaim, lease_s + 30, 0.2):
            failed.append("nobody could claim the job after its lease expired")
        with session_scope(sessions) as session:
            try:
                complete(session, stale, {"done_by": "doomed-worker"})
                failed.append("the dead worker's stale claim could still complete the job")
            except LeaseLost:
                pass
        with session_scope(sessions) as session:
            job = session.get(Job, job_id)
            if job.status != "succeeded" or job.result != {"done_by": "survivor"} or job.attempts != 2:
                failed.append(f"job ended {job.status} {job.result} after {job.attempts} attempts")
            if claim(session, "late", lease_s=60) is not None:
                failed.append("a finished job was claimed again")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        engine.dispose()
    return _outcome(failed)


def registry_enospc(work: Path) -> dict:
    """The disk fills while an adapter is published (ENOSPC injected on the copy and on the manifest)."""
    from unittest import mock

    import training.registry as registry
    from training.registry import AdapterRegistry, Manifest

    failed: list[str] = []
    src = work / "adapter"
    src.mkdir(parents=True, exist_ok=True)
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    (src / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    reg = AdapterRegistry(work / "adapters")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def manifest(version: str) -> Manifest:
        return Manifest("support", version, "base", "sha256:0", "sha256:0", "sha256:0", seed=0)

    for where, target in (("copy", "shutil.copy2"), ("manifest", "atomic_write_json")):
        with mock.patch.object(
            registry.shutil if where == "copy" else registry, target.split(".")[-1], side_effect=full
        ):
            try:
                reg.publish(src, manifest("v1"), allow_unservable=True)
                failed.append(f"disk full on the {where}: publish reported success")
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    failed.append(f"disk full on the {where}: {err!r} instead of ENOSPC")
        if reg.list():
            failed.append(f"disk full on the {where}: a version is listed")
        if leftovers := list((work / "adapters").rglob(".tmp-*")):
            failed.append(f"disk full on the {where}: {len(leftovers)} temporary folders left")
    try:
        published = reg.publish(src, manifest("v1"), allow_unservable=True)
        if not (published / "manifest.json").exists():
            failed.append("the publish after the disk was freed has no manifest")
    except Exception as err:
        failed.append(f"the publish after the disk was freed failed: {err!r}")
    return _outcome(failed)


_PARENT = """
import sys, time
from pathlib import Path
from core.vllm import VllmServer
port = int(sys.argv[1])
server = VllmServer(Path("."), port=port, command=[sys.executable, "-m", "bench.fault_upstream", "--port", str(port)])
server.start()
server.wait_ready(60)
print(server.proc.pid, flush=True)
time.sleep(3600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def orphan_vllm(work: Path) -> dict:
    """The gateway (here: a process that starts vLLM through `core.vllm.VllmServer`) is SIGKILLed."""
    failed: list[str] = []
    port = free_port()
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(port)], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        line = parent.stdout.readline().strip() if parent.stdout else ""
        if not line.isdigit():
            return _outcome([f"the stand-in vLLM did not start: {line!r}"])
        child = int(line)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        if not _wait(lambda: not _alive(child), 20):
            failed.append(f"vLLM (pid {child}) outlived the process that started it")
        elif not _wait(lambda: _port_free(port), 10):
            failed.append(f"port {port} is still held after vLLM ended")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child and _alive(child):
            os.killpg(child, signal.SIGKILL)  # its own group: the orphan and anything it forked
    return _outcome(failed)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex((HOST, port)) != 0


def review_outage(work: Path, db_url: str | None = None) -> dict:
    """A reviewer decides while PostgreSQL is unreachable: a clear 503 (not a 500, not a silent
    success), and once the database is back the retried decision lands and the held client gets it;
    a decision accepted before the outage is still there after."""
    failed: list[str] = []
    procs = Processes(work)
    try:
        with proxied_postgres(db_url) as (proxy, direct, via_proxy):
            port = free_port()
            start_upstream(procs, port)
            hold_all = {"TUNEGATE_GUARDRAILS__POLICY__ANNOTATE_AT": "0", "TUNEGATE_GUARDRAILS__POLICY__HOLD_AT": "0"}
            gw = start_gateway(
                procs,
                work / "var",
                f"http://{HOST}:{port}",
                key_db_url=direct,
                env=hold_all,
                db_url=via_proxy,
            )  # every answer is held for review
            reviewer = {"Authorization": f"Bearer {make_key(direct, 'reviewer', 'reviewer')}"}
            held = [gw.post(chat(f"question {i}")) for i in range(2)]
            if [r.status_code for r in held] != [202, 202]:
                return _outcome([f"answers were not held: {[(r.status_code, r.text[:100]) for r in held]}"])
            polls = [gw.url + r.json()["poll"] for r in held]

            def decide(verdict: str = "approve") -> httpx.Response:
                claimed = httpx.post(gw.url + "/v1/review/claim", headers=reviewer, timeout=30)
                if claimed.status_code != 200:
                    return claimed
                item = claimed.json()["id"]
                body = {"verdict": verdict, "reason": "checked"}
                return httpx.post(f"{gw.url}/v1/review/items/{item}/decision", json=body, headers=reviewer, timeout=30)

            if (first := decide()).status_code != 200:
                failed.append(f"the decision before the outage: {first.status_code} {first.text[:200]}")
            proxy.down()
            if problem := _clear_error(decide(), (503,)):
                failed.append(f"a decision while the database is down: {problem}")
            if problem := _clear_error(httpx.get(polls[1], headers=gw.headers, timeout=30), (503,)):
                failed.append(f"a held client polling while the database is down: {problem}")
            proxy.up()
            if not _wait(lambda: decide().status_code == 200, 30, 0.5):
                failed.append("the retried decision did not land after the database came back")
            for poll in polls:
                outcome = httpx.get(poll, headers=gw.headers, timeout=30)
                if outcome.status_code != 200 or outcome.json().get("verdict") != "approve":
                    failed.append(f"decision lost: {poll} -> {outcome.status_code} {outcome.text[:200]}")
    except Exception as err:
        failed.append(f"{type(err).__name__}: {err}")
    finally:
        procs.stop_all()
    return _outcome(failed)


def gateway_killed(work: Path, rate: float = 20.0, before_s: float = 2.0) -> dict:
    """The gateway SIGKILLed under load (with the default traffic-log flush interval), then started
    again on the same database: the rows of answered requests that were still queued in its memory
    are what `lost_records` counts. (That its vLLM goes with it is `orphan_vllm`.)"""
    failed: list[str] = []
    procs = Processes(work)
    answered = lost = 0
    try:
        port = free_port()
        start_upstream(procs, port)
        flush = {"log_flush_interval_s": 0.2}  # the default, not the rig's 0.05 s
        gw = start_gateway(procs, work / "var", f"http://{HOST}:{port}", gateway=flush)
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    statuses.append(gw.post(chat("hello"), timeout=10).status_code)
                except httpx.HTTPError:
                    statuses.append(0)
                time.sleep(1 / rate)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        time.sleep(before_s)
        os.killpg(gw.proc.pgid, signal.SIGKILL)
        gw.proc.popen.wait()
        stop.set()
        loader.join(30)
        answered = statuses.count(200)
        again = start_gateway(procs, work / "var", f"http://{HOST}:{port}", db_url=gw.db_url, gateway=flush)
        if again.post(chat("hello")).status_code != 200:
            failed.append("the restarted gateway does not answer")
        _wait(lambda: gw.logged().count(200) >= answered + 1, 5, 0.2)
        lost = max(0, answered + 1 - gw.logged().count(200))
        if lost:
            failed.append(f"{lost} of {answered} answered requests are missing from the traffic log")
    except Exception as err:
        failed.append(f"{type(err).__name__}: {err}")
    finally:
        procs.stop_all()
    return _outcome(failed, answered=answered, lost_records=lost)
