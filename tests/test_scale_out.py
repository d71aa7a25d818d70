"""Many gateways, one database: two gateway processes and two `tunegate worker` processes on one PostgreSQL.

Real OS processes (`bench.fault_rig.start_gateway`: uvicorn on `gateway.app:create_app`, and
`python -m tunegate.cli worker`), the same settings file and database URL, `bench.fault_upstream` as
vLLM (it answers every completion and says yes to adapter loads). One test, in order:

1. traffic: 100 requests split between both gateways at once, each with its own `user`; the
   `requests` table holds each request id and each end user exactly once (none lost, none doubled);
2. review: 20 answers held (route `held`, whose policy holds every answer), then 4 reviewers claim
   through both gateways at once until the queue is empty, deciding each item right after claiming
   it: no item is handed to two reviewers, every item is decided once, every held request logged once;
3. promotion: `support` serves adapter v1; the test's own session moves v2 gated -> canary -> active
   and gives it the route's weight; both gateways route new requests to v2 within 5 s;
4. two workers with `loop.interval_s` 1 for about 10 s: passes of one route never overlap, no job
   is completed twice (attempts == 1), and at most one pass per route is pending whenever sampled.

A missing PostgreSQL skips on a developer's machine and fails in CI (`postgres_database`).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from core.db import (
    Adapter,
    Job,
    Request,
    ReviewDecision,
    ReviewItem,
    make_engine,
    session_factory,
    session_scope,
    upgrade,
)
from core.io import free_port
from core.lifecycle import set_weights, transition
from core.vocab import AdapterStatus, JobStatus, ReviewStatus

from .conftest import reset_postgres_schema

pytestmark = pytest.mark.postgres

N_REQUESTS = 100
N_HELD = 20
REVIEWERS = 4
PROMOTION_S = 5.0
WORKERS_RUN_S = 10.0
S = AdapterStatus

SETTINGS = """\
routes:
  support:
    targets: [{adapter: support, version: v1}]
  held:
    targets: [{adapter: null}]
    policy: {annotate_at: 0.0, hold_at: 0.0, block_at: 1.01}
guardrails:
  detectors: [grounding]   # lexical, no model to load; without a context its risk is 0.5
review:
  sample_rate: 0.0         # only the `held` route's answers go to review
gateway:
  key_cache_s: 0
loop:
  interval_s: 1
"""


def chat(model: str, user: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": f"Question from {user}?"}], "max_tokens": 8,
            "user": user}  # fmt: skip


def wait_for(what: str, check, timeout_s: float, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s (last: {found!r})")
        time.sleep(every_s)


@pytest.fixture
def db_url(postgres_database: str) -> str:
    reset_postgres_schema(postgres_database)
    upgrade(postgres_database)
    return postgres_database


def test_two_gateways_and_two_workers_share_one_database(tmp_path: Path, db_url: str) -> None:
    from bench.fault_rig import make_key, start_gateway, start_upstream
    from bench.gateway_harness import Processes

    config = tmp_path / "tunegate.yaml"
    config.write_text(SETTINGS)
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    with session_scope(sessions) as session:  # both versions registered; the settings make v1 active
        v1, v2 = (Adapter(name="support", version=v, base_model_hash="h") for v in (1, 2))
        session.add_all([v1, v2])
        session.flush()
        v1_id, v2_id = v1.id, v2.id

    procs = Processes(tmp_path)
    try:
        upstream_port = free_port()
        start_upstream(procs, upstream_port)
        vllm = f"http://127.0.0.1:{upstream_port}"
        env = {"TUNEGATE_CONFIG": str(config)}
        gateways = [start_gateway(procs, tmp_path / f"gw{i}", vllm, db_url=db_url, env=env) for i in range(2)]
        client = httpx.Client(timeout=30)

        # --- 1. each request logged once ------------------------------------------------------------
        def send(i: int) -> str:
            gw = gateways[i % 2]
            answer = client.post(gw.url + "/v1/chat/completions", json=chat("support", f"user-{i}"), headers=gw.headers)
            assert answer.status_code == 200, answer.text
            return answer.headers["X-Request-Id"]

        with ThreadPoolExecutor(16) as pool:
            sent = list(pool.map(send, range(N_REQUESTS)))
        assert len(set(sent)) == N_REQUESTS

        def traffic(route: str) -> list[tuple[str, str, int | None]]:
            with sessions() as session:
                query = sa.select(Request.id, Request.end_user, Request.adapter_id).where(Request.route == route)
                return list(session.execute(query))

        wait_for("the traffic log holds every request", lambda: len(traffic("support")) >= N_REQUESTS, 10)
        time.sleep(0.5)  # a doubled row would arrive with the same flush or the next one
        rows = traffic("support")
        assert len(rows) == N_REQUESTS
        assert sorted(r.id for r in rows) == sorted(sent)  # each id once, none unknown
        assert Counter(r.end_user for r in rows) == Counter(f"user-{i}" for i in range(N_REQUESTS))
        assert {r.adapter_id for r in rows} == {v1_id}

        # --- 2. each review item handed to one reviewer at a time -------------------------------------
        def hold(i: int) -> tuple[str, str]:
            gw = gateways[i % 2]
            answer = client.post(gw.url + "/v1/chat/completions", json=chat("held", f"held-{i}"), headers=gw.headers)
            assert answer.status_code == 202, answer.text
            return answer.headers["X-Request-Id"], answer.headers["Location"].rsplit("/", 1)[1]

        with ThreadPoolExecutor(8) as pool:
            held = dict(pool.map(hold, range(N_HELD)))  # request id -> review item id
        reviewer_keys = [make_key(db_url, f"reviewer-{i}", "reviewer") for i in range(REVIEWERS)]
        claims: list[tuple[str, str, int]] = []  # (item, reviewer, gateway)
        lock, start = threading.Lock(), threading.Barrier(REVIEWERS)

        def review(r: int) -> None:
            headers = {"Authorization": f"Bearer {reviewer_keys[r]}"}
            start.wait()
            for n in range(10 * N_HELD):
                gw = gateways[(r + n) % 2]  # every reviewer goes through both gateways in turn
                claimed = client.post(gw.url + "/v1/review/claim", headers=headers)
                if claimed.status_code == 204:
                    return
                assert claimed.status_code == 200, claimed.text
                item = claimed.json()["id"]
                with lock:
                    claims.append((item, f"reviewer-{r}", (r + n) % 2))
                decided = client.post(
                    gw.url + f"/v1/review/items/{item}/decision", headers=headers, json={"verdict": "approve"}
                )
                assert decided.status_code == 200, decided.text

        with ThreadPoolExecutor(REVIEWERS) as pool:
            list(pool.map(review, range(REVIEWERS)))
        claimed_items = Counter(item for item, _, _ in claims)
        assert claimed_items == Counter(set(held.values())), "an item was handed out twice, or not at all"
        assert {gw for _, _, gw in claims} == {0, 1}
        with sessions() as session:
            items = session.scalars(sa.select(ReviewItem).where(ReviewItem.id.in_(list(held.values())))).all()
            assert {i.status for i in items} == {ReviewStatus.DECIDED}
            verdicts = session.execute(sa.select(ReviewDecision.review_item_id, ReviewDecision.reviewer)).all()
            # one verdict each, by the reviewer it was handed to
            assert sorted(verdicts) == sorted((item, reviewer) for item, reviewer, _ in claims)
        held_rows = traffic("held")
        assert sorted(r.id for r in held_rows) == sorted(held)  # the hold wrote the row; nobody logged it again
        outcome = client.get(gateways[1].url + f"/v1/reviews/{held[sorted(held)[0]]}", headers=gateways[0].headers)
        assert outcome.status_code in (200, 404)  # another key's request: 404 (not readable), else final

        # --- 3. a promotion reaches both gateways within seconds ----------------------------------
        with session_scope(sessions) as session:
            new, old = session.get_one(Adapter, v2_id), session.get_one(Adapter, v1_id)
            transition(session, new, S.GATED, "test", "gate passed")
            transition(session, new, S.CANARY, "test", "canary")
            set_weights(session, "support", {v1_id: 0.5, v2_id: 0.5}, "test", "canary 50 %")
            transition(session, new, S.ACTIVE, "test", "promoted")
            transition(session, old, S.RETIRED, "test", "replaced")
            set_weights(session, "support", {v2_id: 1.0}, "test", "promoted")
        promoted_at = time.monotonic()
        seen: dict[int, float] = {}
        n = 0
        while len(seen) < 2:
            for g, gw in enumerate(gateways):
                if g in seen:
                    continue
                n += 1
                send_to = client.post(
                    gw.url + "/v1/chat/completions", json=chat("support", f"promo-{g}-{n}"), headers=gw.headers
                )
                assert send_to.status_code == 200, send_to.text
                request_id = send_to.headers["X-Request-Id"]
                adapter = wait_for(
                    "the promotion probe is logged", lambda rid=request_id: _adapter_of(sessions, rid), 10, 0.05
                )[0]
                if adapter == v2_id:
                    seen[g] = time.monotonic() - promoted_at
            assert time.monotonic() - promoted_at < PROMOTION_S + 2, f"v2 reached only gateways {sorted(seen)}"
            time.sleep(0.1)
        assert max(seen.values()) <= PROMOTION_S, seen
        # and from then on every request of every gateway is v2's
        for g, gw in enumerate(gateways):
            for k in range(5):
                answer = client.post(gw.url + "/v1/chat/completions", json=chat("support", f"after-{g}-{k}"),
                                     headers=gw.headers)  # fmt: skip
                rid = answer.headers["X-Request-Id"]
                assert wait_for("logged", lambda rid=rid: _adapter_of(sessions, rid), 10, 0.05)[0] == v2_id

        # --- 4. the loop's jobs run once ----------------------------------------------------------
        worker_env = {
            "TUNEGATE_CONFIG": str(config),
            "TUNEGATE_DATABASE__URL": db_url,
            "TUNEGATE_VAR_DIR": str(tmp_path / "worker"),
            "TUNEGATE_LOOP__INTERVAL_S": "1",
        }
        workers = [
            procs.start(
                f"worker-{i}", [sys.executable, "-m", "tunegate.cli", "worker", "--vllm-url", vllm], env=worker_env
            )  # fmt: skip
            for i in range(2)
        ]
        routes = ("held", "support")
        pending_seen: list[dict[str, int]] = []

        def sample() -> dict[str, int]:
            with sessions() as session:
                pending = session.execute(
                    sa.select(Job.payload, Job.status).where(
                        Job.kind == "loop.pass", Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
                    )
                ).all()
            per_route = Counter((p["route"], s) for p, s in pending)
            pending_seen.append(dict(Counter(p["route"] for p, _ in pending)))
            for route in routes:
                assert per_route[(route, JobStatus.QUEUED)] <= 1, per_route
                assert per_route[(route, JobStatus.RUNNING)] <= 1, per_route
            return per_route

        def passed() -> tuple[set[str], set[str]]:
            """The routes with a finished pass, and the workers that finished one."""
            sample()
            for w in workers:
                assert w.alive(), w.log_tail()
            with sessions() as session:
                done = session.execute(
                    sa.select(Job.payload, Job.claimed_by).where(
                        Job.kind == "loop.pass", Job.status == JobStatus.SUCCEEDED
                    )
                ).all()
            return {payload["route"] for payload, _ in done}, {by for _, by in done}

        # a worker's first pass over `support` loads the MiniLM embedder (review priority): wait for it
        def ready() -> bool:
            routes_done, workers_done = passed()
            return routes_done == set(routes) and len(workers_done) == 2

        wait_for("a finished pass of every route, and one by each worker", ready, 90, 0.3)
        ran_from = time.monotonic()
        while time.monotonic() - ran_from < WORKERS_RUN_S:
            passed()
            time.sleep(0.2)
        for w in workers:
            procs.stop(w)

        with sessions() as session:
            passes = session.scalars(sa.select(Job).where(Job.kind == "loop.pass").order_by(Job.started_at)).all()
        done = [j for j in passes if j.status == JobStatus.SUCCEEDED]
        failed = [(j.id, j.error) for j in passes if j.status == JobStatus.FAILED or j.error]
        assert failed == [], failed
        assert all(j.attempts == 1 for j in done), [(j.id, j.attempts) for j in done]
        per_route: dict[str, list[Job]] = defaultdict(list)
        for job in done:
            per_route[job.payload["route"]].append(job)
        assert set(per_route) == set(routes)
        for route, jobs in per_route.items():
            assert len(jobs) >= 3, (route, len(jobs))
            for before, after in pairwise(jobs):
                assert before.finished_at <= after.started_at, (route, before.id, after.id)
        assert len({j.claimed_by for j in done}) == 2, "one worker did everything"
        assert pending_seen and all(count <= 2 for s in pending_seen for count in s.values())
        # every probe of the promotion was logged once too
        users = Counter(r.end_user for r in traffic("support"))
        assert max(users.values()) == 1 and len(users) == N_REQUESTS + n + 2 * 5
    finally:
        procs.stop_all()
        engine.dispose()


def _adapter_of(sessions, request_id: str) -> tuple[int | None] | None:
    with sessions() as session:
        row = session.execute(sa.select(Request.adapter_id).where(Request.id == request_id)).first()
        return None if row is None else (row[0],)
