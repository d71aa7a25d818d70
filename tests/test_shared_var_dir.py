"""Several gateway processes on one `var_dir` (replicas and uvicorn workers on a shared volume): each
TrafficLog owns its journal and spill files under a `flock`ed owner lock, so one process draining never
drops another's journalled rows, and a start replays the files of dead processes only (SIGKILL
included), never those of a live one. The database is real; the processes are real where it matters."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from core.db import Request, utcnow
from core.settings import GatewaySettings
from gateway.metrics import Metrics
from gateway.recorder import TrafficLog
from gateway.records import LEGACY, RowFile, clean_row

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = GatewaySettings(log_batch_size=10, log_flush_interval_s=0.01)


def row() -> dict:
    return {"id": uuid.uuid4().hex, "created_at": utcnow(), "route": "base", "endpoint": "chat",
            "stream": False, "status_code": 200, "prompt_text": "user: hi", "answer_text": "hello"}  # fmt: skip


def stored(sessions, ids) -> set[str]:
    with sessions() as session:
        return set(session.scalars(select(Request.id).where(Request.id.in_(list(ids)))))


def new_log(sessions, var_dir: Path) -> TrafficLog:
    return TrafficLog(sessions, SETTINGS, Metrics(), backoff_s=(0.0, 0.0), var_dir=var_dir)


async def drain(log: TrafficLog, rows: list[dict]) -> None:
    """Start `log`, journal `rows` through it, wait until its journal is dropped, close it."""
    log.start()
    for r in rows:
        await log.record_durably(r)
    for _ in range(400):
        if not log.journal.path.exists() and not list(log.var_dir.glob(f"{log.journal.path.name}.*")):
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the journal was never dropped")
    await log.close()


def test_one_process_draining_leaves_anothers_journal_alone(db_sessions, tmp_path):
    var = tmp_path / "var"
    mine, theirs = [row() for _ in range(3)], [row() for _ in range(4)]

    async def scenario() -> None:
        other = new_log(db_sessions, var)  # journals, but its writer has not written yet
        for r in theirs:
            await other.record_durably(r)
        journal = other.journal.path.read_text()
        await drain(new_log(db_sessions, var), mine)  # starts (adopts orphans), drains, drops its journal
        assert other.journal.path.read_text() == journal, "another live process's journal is untouched"
        assert stored(db_sessions, [r["id"] for r in theirs]) == set()
        assert other.owner.lock_path.exists()
        other.start()  # its own writer stores them
        await other.close()

    asyncio.run(scenario())
    assert stored(db_sessions, [r["id"] for r in mine + theirs]) == {r["id"] for r in mine + theirs}
    assert not list(var.glob("traffic-*")), "journals dropped and locks released"


def test_the_lock_is_held_until_close_and_released_by_it(db_sessions, tmp_path):
    log = new_log(db_sessions, tmp_path)

    async def scenario() -> None:
        log.start()
        await log.record_durably(row())
        with log.owner.lock_path.open("r+b") as probe:  # what another process's adopter does
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            await log.close()
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
        assert not log.owner.lock_path.exists() and not log.owner.held

    asyncio.run(scenario())
    assert log.owner.name.split("-")[-2] == str(os.getpid())


def test_files_of_earlier_versions_are_replayed_once(db_sessions, tmp_path):
    rows = [row() for _ in range(5)]
    RowFile(tmp_path / LEGACY[0]).append([clean_row(r) for r in rows[:2]])  # the single journal
    RowFile(tmp_path / LEGACY[1]).append([clean_row(r) for r in rows[2:4]])  # the single spill
    RowFile(tmp_path / f"{LEGACY[1]}.0123abcd.replay").append([clean_row(rows[4])])  # a replay cut short
    asyncio.run(drain(new_log(db_sessions, tmp_path), []))
    assert stored(db_sessions, [r["id"] for r in rows]) == {r["id"] for r in rows}
    assert not list(tmp_path.glob("traffic-*"))


JOURNALLER = textwrap.dedent(
    """
    import asyncio, sys, uuid
    from pathlib import Path
    from core.db import make_engine, session_factory, utcnow
    from core.settings import GatewaySettings
    from gateway.metrics import Metrics
    from gateway.recorder import TrafficLog

    async def main(url, var_dir, n):
        log = TrafficLog(session_factory(make_engine(url)), GatewaySettings(), Metrics(), var_dir=Path(var_dir))
        ids = []
        for _ in range(int(n)):  # answered: journalled, never written (the writer is not started)
            row = {"id": uuid.uuid4().hex, "created_at": utcnow(), "route": "base", "endpoint": "chat",
                   "stream": False, "status_code": 200, "prompt_text": "user: hi", "answer_text": "hello"}
            await log.record_durably(row)
            ids.append(row["id"])
        print(log.owner.name, *ids, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(*sys.argv[1:]))
    """
)


def journaller(url: str, var_dir: Path, n: int) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", JOURNALLER, url, str(var_dir), str(n)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline().split()
    assert line, f"the journalling process died (rc {proc.poll()})"
    return proc, line[0], line[1:]


def test_a_sigkilled_process_journal_is_replayed_by_another_and_a_live_ones_is_not(
    migrated_db_url, db_sessions, tmp_path
):
    var = tmp_path / "var"
    procs: list[subprocess.Popen] = []
    try:
        killed, killed_owner, killed_ids = journaller(migrated_db_url, var, 5)
        procs.append(killed)
        live, live_owner, live_ids = journaller(migrated_db_url, var, 3)
        procs.append(live)
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        live_files = {p: p.read_bytes() for p in var.glob(f"traffic-{live_owner}.*")}
        assert {p.name for p in live_files} == {f"traffic-{live_owner}.lock", f"traffic-{live_owner}.journal.jsonl"}
        assert (var / f"traffic-{killed_owner}.journal.jsonl").exists()

        asyncio.run(drain(new_log(db_sessions, var), [row()]))  # this process starts on the same var_dir

        assert stored(db_sessions, killed_ids) == set(killed_ids), "the killed process's answered rows are in"
        assert not list(var.glob(f"traffic-{killed_owner}*")), "its files were replayed, then removed"
        assert stored(db_sessions, live_ids) == set(), "the live process's rows are its own to write"
        assert {p: p.read_bytes() for p in var.glob(f"traffic-{live_owner}.*")} == live_files
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            proc.stdout.close()
