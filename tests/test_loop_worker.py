"""tunegate.loop as a job queue (SQLite and PostgreSQL): `Loop.tick` seeds the routes, files one `loop.pass`
per route, runs each due pass once (also with two workers at once), records a failing pass on its job
and goes on, and keeps exactly one pending pass per route.

No vLLM: the routes have no traffic and no candidates, so no step calls the server; the URL points at
a port nothing listens on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from core.db import Job, session_scope, utcnow
from core.settings import Settings, load_settings
from core.vocab import JobStatus
from tunegate.loop import PASS_JOB, Loop, _next_pass

ROUTES = ("billing", "support")
INTERVAL_S = 30
NOWHERE = "http://127.0.0.1:9"
STEPS = ("assign", "drift", "prioritise", "agreement", "trigger", "gate", "canary")


@pytest.fixture
def settings(migrated_db_url: str, tmp_path: Path) -> Settings:
    empty = tmp_path / "tunegate.yaml"  # no ./tunegate.yaml or $TUNEGATE_CONFIG of the machine's
    empty.write_text("{}\n")
    return load_settings(
        empty,
        var_dir=tmp_path / "var",
        database={"url": migrated_db_url},
        routes={route: {"targets": [{"adapter": None}]} for route in ROUTES},
        loop={"interval_s": INTERVAL_S},
    )


@pytest.fixture
def loops(settings: Settings) -> Iterator[list[Loop]]:
    """Two workers, each with its own engine (as two processes would have)."""
    made = [Loop(settings, NOWHERE, worker=f"w{i}") for i in range(2)]
    yield made
    for loop in made:
        loop.sessions.kw["bind"].dispose()


def pass_jobs(loop: Loop) -> list[Job]:
    with loop.sessions() as session:
        return list(session.scalars(sa.select(Job).where(Job.kind == PASS_JOB).order_by(Job.id)).all())


def by_route(jobs: list[Job], status: str) -> dict[str, list[Job]]:
    out: dict[str, list[Job]] = {route: [] for route in ROUTES}
    for job in jobs:
        if job.status == status:
            out[job.payload["route"]].append(job)
    return out


def counts(loop: Loop, status: str) -> dict[str, int]:
    return {route: len(found) for route, found in by_route(pass_jobs(loop), status).items()}


def test_a_tick_seeds_the_routes_runs_one_pass_each_and_files_the_next(loops: list[Loop]) -> None:
    loop = loops[0]
    before = utcnow()
    found = loop.tick()
    after = utcnow()

    assert loop.routes() == list(ROUTES)
    done = by_route(pass_jobs(loop), JobStatus.SUCCEEDED)
    assert {route: len(jobs) for route, jobs in done.items()} == {"billing": 1, "support": 1}
    for route, (job,) in done.items():
        assert job.claimed_by == "w0" and job.attempts == 1 and job.error is None
        assert set(job.result) >= {f"{route}.{step}" for step in STEPS} | {"score"}
        assert job.result[f"{route}.gate"] == [] and job.result[f"{route}.canary"] == []
        assert job.result[f"{route}.drift"] is None  # no traffic yet
        assert job.result[f"{route}.trigger"]["fire"] is False
    # What tick returns is what the passes found (plus the trainings, none here, and no errors).
    assert found["train"] == [] and "errors" not in found
    assert {f"{route}.{step}" for route in ROUTES for step in STEPS} <= set(found)

    queued = by_route(pass_jobs(loop), JobStatus.QUEUED)
    for route, jobs in queued.items():
        assert len(jobs) == 1, route
        due = jobs[0].run_after
        assert before + timedelta(seconds=INTERVAL_S - 1) <= due <= after + timedelta(seconds=INTERVAL_S + 1)

    # Nothing is due yet: a second tick right away runs nothing and files nothing.
    again = loop.tick()
    assert again == {"train": [], "jobs": []}
    assert counts(loop, JobStatus.SUCCEEDED) == {"billing": 1, "support": 1}
    assert counts(loop, JobStatus.QUEUED) == {"billing": 1, "support": 1}
    assert len(pass_jobs(loop)) == 4

    # force: the queued passes are due now, each runs once more, and the next ones are filed.
    forced = loop.tick(force=True)
    assert {f"{route}.canary" for route in ROUTES} <= set(forced)
    assert counts(loop, JobStatus.SUCCEEDED) == {"billing": 2, "support": 2}
    assert counts(loop, JobStatus.QUEUED) == {"billing": 1, "support": 1}
    assert len(pass_jobs(loop)) == 6  # the forced ones were the queued ones; one new queued per route


def test_two_workers_run_each_pass_once(loops: list[Loop], migrated_db_url: str) -> None:
    results: list[dict] = []

    def one_round() -> None:
        if migrated_db_url.startswith("postgresql"):
            # Both workers tick(force=True) at the same moment.
            barrier, errors = threading.Barrier(2), []

            def work(loop: Loop) -> None:
                try:
                    barrier.wait()
                    results.append(loop.tick(force=True))
                except BaseException as err:  # noqa: BLE001 - asserted below
                    errors.append(err)

            threads = [threading.Thread(target=work, args=(loop,)) for loop in loops]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            assert not any(thread.is_alive() for thread in threads)
            assert errors == []
        else:
            # SQLite has one writer: the workers take turns, in the order two concurrent ticks take on
            # PostgreSQL (both forced schedules, then each claims what is due). A forced tick after the
            # other worker's passes finished would rightly run the route's next pass now.
            for loop in loops:
                loop.schedule(force=True)
            for loop in loops:
                results.append(loop.tick())

    one_round()
    assert all("errors" not in r for r in results)
    assert counts(loops[0], JobStatus.SUCCEEDED) == {"billing": 1, "support": 1}
    assert counts(loops[0], JobStatus.QUEUED) == {"billing": 1, "support": 1}
    assert counts(loops[0], JobStatus.RUNNING) == {"billing": 0, "support": 0}
    assert len(pass_jobs(loops[0])) == 4  # no duplicate pass was ever filed
    assert all(j.attempts == 1 for j in pass_jobs(loops[0]) if j.status == JobStatus.SUCCEEDED)
    # Every route's findings reached exactly one worker's result.
    for route in ROUTES:
        assert sum(f"{route}.canary" in r for r in results) == 1

    # A second round: one more pass per route, still one queued pass each.
    results.clear()
    one_round()
    assert all("errors" not in r for r in results)
    assert counts(loops[0], JobStatus.SUCCEEDED) == {"billing": 2, "support": 2}
    assert counts(loops[0], JobStatus.QUEUED) == {"billing": 1, "support": 1}
    assert len(pass_jobs(loops[0])) == 6
    assert all(j.attempts == 1 for j in pass_jobs(loops[0]) if j.status == JobStatus.SUCCEEDED)


def test_a_failing_pass_is_recorded_and_the_other_route_still_runs(
    loops: list[Loop], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Loop.run_pass

    def run_pass(self: Loop, route: str) -> dict:
        if route == "support":
            raise RuntimeError("injected fault")
        return real(self, route)

    monkeypatch.setattr(Loop, "run_pass", run_pass)
    loop = loops[0]
    before = utcnow()
    found = loop.tick()

    assert [e["kind"] for e in found["errors"]] == [PASS_JOB]
    assert "injected fault" in found["errors"][0]["error"]
    assert "billing.canary" in found and "support.canary" not in found

    jobs = pass_jobs(loop)
    support = [j for j in jobs if j.payload["route"] == "support"]
    assert len(support) == 1  # requeued for a retry, not doubled by a new pass
    (job,) = support
    assert job.status == JobStatus.QUEUED and job.attempts == 1
    assert job.error == "RuntimeError: injected fault"
    assert job.claimed_by is None and job.run_after >= before + timedelta(seconds=INTERVAL_S - 1)
    assert counts(loop, JobStatus.SUCCEEDED) == {"billing": 1, "support": 0}
    assert counts(loop, JobStatus.QUEUED) == {"billing": 1, "support": 1}

    # Every attempt fails: after max_attempts the job is failed for good, with its error.
    for attempt in range(2, job.max_attempts + 1):
        loop.tick(force=True)
        (job,) = [j for j in pass_jobs(loop) if j.payload["route"] == "support" and j.id == job.id]
        assert job.attempts == attempt
    assert job.status == JobStatus.FAILED and job.error == "RuntimeError: injected fault"
    assert job.finished_at is not None
    # ... and the route gets a fresh pass on the next tick (the failed one is not pending).
    loop.tick()
    assert counts(loop, JobStatus.QUEUED)["support"] == 1
    assert counts(loop, JobStatus.SUCCEEDED)["billing"] == job.max_attempts


def test_schedule_files_one_pass_per_route_and_next_pass_only_moves_it_earlier(loops: list[Loop]) -> None:
    loop = loops[0]
    loop.schedule()
    loop.schedule()
    loops[1].schedule()
    jobs = pass_jobs(loop)
    assert counts(loop, JobStatus.QUEUED) == {"billing": 1, "support": 1} and len(jobs) == 2
    assert all(j.run_after is None for j in jobs)  # a new route's first pass is due at once

    def support_job() -> Job:
        (job,) = [j for j in pass_jobs(loop) if j.payload["route"] == "support"]
        return job

    with session_scope(loop.sessions) as session:
        session.get(Job, support_job().id).run_after = utcnow() + timedelta(hours=1)
    loop.schedule()  # not forced: a queued pass stays as it is
    assert support_job().run_after > utcnow() + timedelta(minutes=59)
    assert len(pass_jobs(loop)) == 2

    # _next_pass never files a second pending pass; it moves the one there earlier, never later.
    with session_scope(loop.sessions) as session:
        _next_pass(session, "support", 600)
    moved = support_job().run_after
    assert utcnow() + timedelta(seconds=590) <= moved <= utcnow() + timedelta(seconds=610)
    with session_scope(loop.sessions) as session:
        _next_pass(session, "support", 3600)
    assert support_job().run_after == moved
    with session_scope(loop.sessions) as session:
        _next_pass(session, "support", 0)
    assert support_job().run_after <= utcnow()
    assert len(pass_jobs(loop)) == 2

    # A running pass with nothing queued: _next_pass files the next one, due after the delay.
    with session_scope(loop.sessions) as session:
        session.get(Job, support_job().id).status = JobStatus.SUCCEEDED
    with session_scope(loop.sessions) as session:
        _next_pass(session, "support", 60)
    queued = by_route(pass_jobs(loop), JobStatus.QUEUED)["support"]
    assert len(queued) == 1 and queued[0].run_after > utcnow() + timedelta(seconds=50)

    # force makes the queued pass due now, without filing another.
    loop.schedule(force=True)
    assert all(j.run_after is None for j in pass_jobs(loop) if j.status == JobStatus.QUEUED)
    assert counts(loop, JobStatus.QUEUED) == {"billing": 1, "support": 1}


def test_a_paused_route_is_scored_but_not_acted_on(loops: list[Loop]) -> None:
    from core.lifecycle import set_paused

    loop = loops[0]
    loop.schedule()
    with session_scope(loop.sessions) as session:
        set_paused(session, "support", True, actor="test", reason="maintenance")
    found = loop.tick(force=True)
    passes = {job["route"]: job for job in found["jobs"] if job["kind"] == PASS_JOB}
    assert passes["support"]["support.paused"] is True and "score" in passes["support"]
    assert not {"support.trigger", "support.gate", "support.canary"} & set(passes["support"])
    assert {"billing.trigger", "billing.gate", "billing.canary"} <= set(passes["billing"])
