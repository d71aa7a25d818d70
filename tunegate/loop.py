"""The closed loop, wired: what a `tunegate worker` does, one step after another, for every route.

One pass (`Loop.run_pass`) over a route, each step in its own transaction, each safe to run again:

    assign reviewed labels (holdout / test set / training)  -> evalsuite.testsets
    score sampled live traffic, refresh verdicts             -> evalsuite.scoring
    drift of risk, flag rate and inputs                      -> evalsuite.drift
    fill the review queue by priority within the budget      -> evalsuite.prioritise
    guard-reviewer agreement, re-fit the guard if it falls   -> evalsuite.agreement
    triggers: file a training job on a content-hashed snapshot -> evalsuite.triggers
    gate candidates through vLLM beside the active version   -> evalsuite.gate
    start and advance canaries (promote or roll back)        -> evalsuite.canary

Passes and trainings are both jobs (`jobs` kinds `loop.pass`, one pending per route, and `train`),
claimed through the jobs table (`core.db.jobs`): several workers split them, each runs once, and a job
whose worker died is claimed again when its lease runs out. A finished pass files the route's next one
`loop.interval_s` later; a finished training makes it due at once (its candidate goes to the gate).
A training curates the snapshot (the contamination rule against the route's test set and holdout),
trains with TRL and registers a `candidate`.

This module is wiring (the `tunegate` layer): it may import every package below it.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from core.db import (
    Adapter,
    EvalRun,
    Job,
    OnlineScore,
    Request,
    jobs,
    make_engine,
    session_factory,
    session_scope,
    utcnow,
)
from core.db.leases import advisory_lock
from core.io import read_jsonl
from core.lifecycle import active_target, is_paused, route_table, seed_routes, version_label
from core.settings import Settings
from core.vllm import chat_greedy, load_adapter
from core.vocab import AdapterStatus, EvalKind, EvalStatus, JobStatus
from evalsuite import canary, drift, gate, testsets, triggers

log = logging.getLogger("tunegate.loop")
TRAIN_LEASE_S = 900  # a training on a CPU takes minutes; the lease outlives it
PASS_JOB = "loop.pass"


def served_name(adapter: Adapter | None, base_name: str) -> str:
    """The name vLLM serves a version under: the gateway's naming, so both share one loaded adapter."""
    return base_name if adapter is None else f"{adapter.name}-v{adapter.version}"


@dataclass
class Loop:
    settings: Settings
    vllm_url: str
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
    sessions: sessionmaker = None  # type: ignore[assignment]
    replay: dict[str, list[dict]] = field(default_factory=dict)  # route -> the base model's training rows
    curated: dict[str, list[dict]] = field(default_factory=dict)  # route -> rows an operator added
    metrics: Any = None  # evalsuite.metrics.LoopMetrics when the worker exports metrics
    last: dict[str, Any] = field(default_factory=dict)  # what the latest pass found, per route and step

    def __post_init__(self) -> None:
        if self.sessions is None:
            self.sessions = session_factory(make_engine(self.settings.database_url))

    @cached_property
    def embed(self):
        return drift.minilm_embedder()

    @cached_property
    def judge(self):
        from evalsuite.scoring import llm_judge

        return llm_judge(self.settings.guardrails)

    def answer(self, model: str, conversations) -> list[str]:
        return chat_greedy(self.vllm_url, model, conversations)

    def routes(self) -> list[str]:
        with session_scope(self.sessions) as session:
            seed_routes(session, self.settings.routes)
            return sorted(route_table(session))

    # --- jobs: passes and trainings, claimed through the jobs table --------------------------------

    def tick(self, force: bool = False) -> dict[str, Any]:
        """Schedule a pass for every route that has none queued (due now with `force`), then run every due
        job this worker can claim: passes and trainings. Returns what each found."""
        self.schedule(force)
        out: dict[str, Any] = {"train": [], "jobs": []}  # `jobs`: what each job found, in the order run
        while (claimed := self._claim()) is not None:
            claim, kind, payload = claimed
            try:
                found, error = (self.run_pass(payload["route"]) if kind == PASS_JOB else self.train(payload)), None
            except Exception as err:  # recorded on the job; the loop goes on
                log.exception("%s job %s failed", kind, claim.id)
                found, error = {}, f"{type(err).__name__}: {err}"
            if not self._finish(claim, kind, payload["route"], found, error):
                continue
            if error is not None:
                out.setdefault("errors", []).append({"job_id": claim.id, "kind": kind, "error": error})
            elif kind == PASS_JOB:
                out.update(found)
            else:
                out["train"].append({"job_id": claim.id, **found})
            out["jobs"].append({"job_id": claim.id, "kind": kind, "route": payload["route"], **found})
        if self.metrics is not None:
            with self.sessions() as session:
                self.metrics.update_from_db(session, self.settings.loop)
                for route, targets in route_table(session).items():
                    for target in targets:
                        self.metrics.set_adapter_status(route, target.label, target.status)
        self.last = _json_safe(out)
        return self.last

    def schedule(self, force: bool = False) -> None:
        """One pending pass per route: a worker that finds none (a new route, a fresh database) files it."""
        with session_scope(self.sessions) as session:
            seed_routes(session, self.settings.routes)
            advisory_lock(session, "tunegate.loop.schedule")  # two workers starting at once file one pass
            pending = session.scalars(
                sa.select(Job).where(Job.kind == PASS_JOB, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
            ).all()
            waiting = {(j.payload or {}).get("route"): j for j in pending}
            for route in route_table(session):
                job = waiting.get(route)
                if job is None:
                    jobs.enqueue(session, PASS_JOB, {"route": route})
                elif force and job.status == JobStatus.QUEUED:
                    job.run_after = None

    def _claim(self) -> tuple[jobs.Claim, str, dict] | None:
        with session_scope(self.sessions) as session:
            job = jobs.claim(session, self.worker, kinds=[PASS_JOB, triggers.TRAIN_JOB], lease_s=TRAIN_LEASE_S)
            if job is None:
                return None
            return jobs.Claim.of(job), job.kind, dict(job.payload)

    def _finish(self, claim: jobs.Claim, kind: str, route: str, found: dict, error: str | None) -> bool:
        """Record the job's end; False when it was no longer ours (its lease ran out and another worker
        took it: that worker's result counts, not this one's)."""
        try:
            with session_scope(self.sessions) as session:
                if error is not None:
                    jobs.fail(session, claim, error, retry_after_s=self.settings.loop.interval_s)
                else:
                    jobs.complete(session, claim, _json_safe(found))
                    # The route's next pass: after the interval, or now when a training just ended (its gate).
                    _next_pass(session, route, 0 if kind == triggers.TRAIN_JOB else self.settings.loop.interval_s)
        except jobs.LeaseLost:
            log.warning("%s job %s outlived its lease; another worker has it now", kind, claim.id)
            return False
        self._count(kind, "ok" if error is None else "error")
        return True

    def _count(self, kind: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.job_finished(kind, result)

    def run_pass(self, route: str) -> dict[str, Any]:
        """Every step for one route (see the module docstring); returns what each found."""
        from evalsuite import scoring

        out: dict[str, Any] = {}
        with session_scope(self.sessions) as session:
            out[f"{route}.assign"] = testsets.assign_reviewed(session, route, self.settings.loop).to_dict()
        with session_scope(self.sessions) as session:
            gold = {r: testsets.gold_answers(session, r) for r in route_table(session)}
            batch = scoring.score_new_traffic(session, self.settings.loop, _merge(gold), judge=self.judge)
            out["score"] = batch.to_dict()
            scoring.refresh_verdicts(session)
        out[f"{route}.drift"] = self.step_drift(route)
        drift_now = out[f"{route}.drift"] or self.latest_drift(route)  # read once, used twice below
        out[f"{route}.prioritise"] = self.step_prioritise(route, drift_now)
        out[f"{route}.agreement"] = self.step_agreement(route)
        with self.sessions() as session:
            paused = is_paused(session, route)
        if paused:  # `tunegate loop pause`: it keeps scoring and watching, it does not act
            out[f"{route}.paused"] = True
            return out
        out[f"{route}.trigger"] = self.step_trigger(route, drift_now)
        out[f"{route}.gate"] = self.step_gate(route)
        out[f"{route}.canary"] = self.step_canary(route)
        return out

    def step_drift(self, route: str) -> dict | None:
        """Newest `window_size` scored exchanges against the oldest `reference_size` (no overlap)."""
        cfg = self.settings.loop.drift
        with session_scope(self.sessions) as session:
            query = (
                sa.select(OnlineScore.risk, OnlineScore.flagged, Request.prompt_text)
                .join(Request, Request.id == OnlineScore.request_id)
                .where(OnlineScore.route == route)
            )
            reference = session.execute(query.order_by(OnlineScore.id).limit(cfg.reference_size)).all()
            current = session.execute(query.order_by(OnlineScore.id.desc()).limit(cfg.window_size)).all()
            total = session.scalar(sa.select(sa.func.count()).where(OnlineScore.route == route)) or 0
            if total < cfg.reference_size + cfg.window_size // 2:
                return None  # the windows would overlap: not enough traffic yet
            current = current[: total - len(reference)]
            report = {
                "risk": drift.numeric_drift(
                    [r.risk for r in reference if r.risk is not None],
                    [r.risk for r in current if r.risk is not None],
                    threshold_small=cfg.p_value,
                    threshold_wasserstein=cfg.wasserstein,
                    threshold_psi=cfg.psi,
                ).to_dict(),
                "flag_rate": drift.rate_drift(
                    [r.flagged for r in reference], [r.flagged for r in current], threshold=cfg.p_value
                ).to_dict(),
                "embedding": drift.embedding_drift(
                    [r.prompt_text or "" for r in reference],
                    [r.prompt_text or "" for r in current],
                    self.embed,
                    auroc_threshold=cfg.auroc,
                ).to_dict(),
            }
            drifted = any(part.get("drifted") for part in report.values())
            summary = {"drift": report, "route": route, "drifted": drifted, "window_end": utcnow().isoformat()}
            session.add(
                EvalRun(kind=EvalKind.ONLINE, status=EvalStatus.SUCCEEDED, finished_at=utcnow(), summary=summary)
            )
        if self.metrics is not None:
            embedding, risk = report["embedding"], report["risk"]
            self.metrics.set_drift(route, embedding.get("auroc"), drifted, risk.get("statistic"))
        return summary

    def latest_drift(self, route: str) -> dict | None:
        """The route's newest drift report (a pass with too little new traffic computes none)."""
        with self.sessions() as session:
            runs = session.scalars(
                sa.select(EvalRun).where(EvalRun.kind == EvalKind.ONLINE).order_by(EvalRun.id.desc()).limit(20)
            ).all()
        return next((r.summary for r in runs if (r.summary or {}).get("route") == route), None)

    def step_prioritise(self, route: str, drift_report: dict | None) -> dict:
        from evalsuite import prioritise

        spec = self.settings.routes.get(route)
        hold_at = (spec.policy if spec and spec.policy else self.settings.guardrails.policy).hold_at
        with session_scope(self.sessions) as session:
            known = [r["messages"][0]["content"] for r in self.replay.get(route, [])[:2000]]
            known += [r["messages"][0]["content"] for r in testsets.training_labels(session, route)]
            embedding = (drift_report or {}).get("drift", {}).get("embedding", {})
            typical = [t["text"] for t in embedding.get("typical_drifted") or []]
            result = prioritise.fill_review_queue(
                session, route, self.settings.loop, hold_at, known, self.embed, drift_texts=typical
            )
            if self.metrics is not None:
                self.metrics.set_review_budget_left(route, result.budget_left)
            return result.to_dict()

    def step_agreement(self, route: str) -> dict:
        from evalsuite import agreement

        with session_scope(self.sessions) as session:
            rows = agreement.agreement_by_window(session, route)
            result: dict = {"windows": [r.to_dict() for r in rows[-3:]]}
            if self.metrics is not None and rows:
                self.metrics.set_agreement(route, rows[-1].agreement)
            if agreement.needs_refit(rows, self.settings.loop):
                from guardrails.calibration import Calibration, DefaultCombination
                from guardrails.guard import calibration_path_for
                from guardrails.registry import build_detectors

                path = calibration_path_for(self.settings.guardrails, self.settings.var_dir)
                current = Calibration.load(path) if path.exists() else DefaultCombination()
                detectors = build_detectors(self.settings.guardrails)
                refit = agreement.refit_calibration(session, detectors, current, path, route=route)
                result["refit"] = refit.to_dict()
            return result

    def step_trigger(self, route: str, drift_report: dict | None) -> dict:
        from evalsuite import scoring

        with session_scope(self.sessions) as session:
            active = active_target(route_table(session).get(route, []))
            rows = [w for w in scoring.window_quality(session, route) if active and w.adapter_version == active.label]
            scored = sum(w.n for w in rows[-3:])
            quality = _mean_quality(rows[-3:])
            drifted = bool((drift_report or {}).get("drifted"))
            decision = triggers.decide(session, route, self.settings.loop, quality, scored, drifted)
            if decision.fire:
                rows_, counts = triggers.snapshot_rows(
                    session, route, self.replay_rows(session, route), self.curated_rows(route), self.settings.loop
                )
                job = triggers.file_training_job(session, decision, rows_, counts, self.snapshot_dir)
                return decision.to_dict() | {"job_id": job.id, "counts": counts}
            return decision.to_dict()

    def replay_rows(self, session, route: str) -> list[dict]:
        """The active version's own training data: its training job's snapshot, or for the base model
        `replay[route]` (the embedded base model's pre-training set)."""
        active = active_target(route_table(session).get(route, []))
        for job in triggers.training_jobs(session, route) if active and active.adapter_id else []:
            if (job.result or {}).get("adapter_id") == active.adapter_id:
                return [row for _, row in read_jsonl(job.payload["snapshot"])]
        return self.replay.get(route, [])

    def curated_rows(self, route: str) -> list[dict]:
        """Rows an operator added for the route: `curated[route]`, and every JSONL file (chat rows,
        `messages`) in `<var_dir>/loop/curated/<route>/`, read when a training is filed."""
        rows = list(self.curated.get(route, []))
        for path in sorted((self.snapshot_dir.parent / "curated" / route).glob("*.jsonl")):
            rows += [{"messages": row["messages"]} for _, row in read_jsonl(path)]
        return rows

    @property
    def snapshot_dir(self) -> Path:
        return self.settings.var_dir / "loop" / "snapshots"

    # --- training jobs --------------------------------------------------------------------------

    def train(self, payload: dict) -> dict:
        """Curate the snapshot against the route's test set and holdout, train, register a candidate."""
        from transformers import AutoTokenizer

        from training.bootstrap import base_model_path
        from training.curation import CurationConfig, curate
        from training.sft import TrainConfig
        from training.workflow import train_and_register

        route = payload["route"]
        with self.sessions() as session:
            tests = testsets.contamination_texts(session, route)
        out = self.snapshot_dir.parent / "runs" / payload["content_hash"][:16]
        base = base_model_path(self.settings)
        # Every label trains: the gate, on the route's test set and holdout, is this model's validation.
        curated = curate(
            [payload["snapshot"]],
            out / "curated",
            CurationConfig(max_tokens=self.settings.vllm.max_model_len, validation_fraction=0.0),
            tokenizer=AutoTokenizer.from_pretrained(base),
            test_texts=tests,
        )
        config = TrainConfig(
            name=route,
            train_file=out / "curated" / "train.jsonl",
            max_steps=self.settings.loop.train_max_steps,
            learning_rate=self.settings.loop.train_learning_rate,
        )
        trained = train_and_register(self.settings, config, progress=False)
        report = curated.to_dict()
        return {
            "adapter_id": trained.get("adapter_id"),
            "version": trained.get("version"),
            "train_rows": curated.train_rows,
            "contaminated_removed": report["rejected_by_rule"].get("contamination", 0),
            "train_loss": trained["metrics"].get("train_loss"),
        }

    # --- gate and canary ------------------------------------------------------------------------

    def _load(self, adapter: Adapter | None) -> str:
        name = served_name(adapter, self.settings.base_model.served_name)
        if adapter is not None:
            path = (self.settings.adapters_dir / adapter.name / f"v{adapter.version}").resolve()
            load_adapter(self.vllm_url, name, path)
        return name

    def step_gate(self, route: str) -> list[dict]:
        records = []
        with session_scope(self.sessions) as session:
            trained = {(j.result or {}).get("adapter_id") for j in triggers.training_jobs(session, route)}
            waiting = session.scalars(
                sa.select(Adapter).where(Adapter.id.in_(trained - {None}), Adapter.status == AdapterStatus.CANDIDATE)
            ).all()
            version = testsets.current_version(session, route)
            for candidate in waiting:
                if _already_waited(session, candidate, version):
                    continue  # "not enough evidence" on this test set version: wait for labels
                active = active_target(route_table(session).get(route, []))
                baseline = session.get(Adapter, active.adapter_id) if active and active.adapter_id else None
                record = gate.run_gate(
                    session,
                    route,
                    candidate,
                    self._load(candidate),
                    baseline,
                    self._load(baseline),
                    self.answer,
                    self.settings.loop.gate,
                )
                records.append(record.to_dict())
        return records

    def step_canary(self, route: str) -> list[str]:
        outcomes = []
        with session_scope(self.sessions) as session:
            for rollout in canary.running_rollouts(session):
                if rollout.route == route:
                    outcomes.append(canary.advance(session, rollout, self.settings.loop.canary))
                    if self.metrics is not None:
                        candidate = session.get_one(Adapter, rollout.candidate_id)
                        self.metrics.set_canary(route, version_label(candidate), canary.canary_state(rollout))
            running = any(r.route == route for r in canary.running_rollouts(session))
            gated = session.scalars(
                sa.select(Adapter)
                .where(Adapter.name == route, Adapter.status == AdapterStatus.GATED)
                .order_by(Adapter.version.desc())
            ).first()
            if gated is not None and not running:
                self._load(gated)
                canary.start_rollout(session, route, gated, self.settings.loop.canary)
                outcomes.append("started")
        return outcomes


def _already_waited(session, candidate: Adapter, test_version: int | None) -> bool:
    last = session.scalars(
        sa.select(EvalRun)
        .where(EvalRun.kind == EvalKind.GATE, EvalRun.adapter_id == candidate.id)
        .order_by(EvalRun.id.desc())
    ).first()
    return bool(last and (last.summary or {}).get("test_version") == test_version)


def _next_pass(session, route: str, delay_s: float) -> None:
    """Keep exactly one pending pass per route, due within `delay_s`.

    The caller's own job is already finished in this transaction. While another pass of the route is
    running (a training ended during it), nothing is filed: that pass files its successor when it ends,
    and a pass filed now would be claimed at once and run beside it. Two callers at once (a pass and a
    training of the same route ending together) take turns on `schedule`'s lock, so neither files a
    second pending pass that the other's query could not see yet."""
    advisory_lock(session, "tunegate.loop.schedule")
    due = utcnow() + timedelta(seconds=delay_s)
    running = session.scalars(sa.select(Job.payload).where(Job.kind == PASS_JOB, Job.status == JobStatus.RUNNING))
    if any((payload or {}).get("route") == route for payload in running):
        return
    queued = session.scalars(
        sa.select(Job).where(Job.kind == PASS_JOB, Job.status == JobStatus.QUEUED).with_for_update()
    ).all()
    mine = [j for j in queued if (j.payload or {}).get("route") == route]
    if not mine:
        jobs.enqueue(session, PASS_JOB, {"route": route}, run_after=due)
    elif mine[0].run_after is None or mine[0].run_after > due:
        mine[0].run_after = due


def _json_safe(found: dict) -> dict:
    return json.loads(json.dumps(found, default=str))


def _merge(gold: dict[str, dict[str, str]]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for per_route in gold.values():
        merged.update(per_route)
    return merged


def _mean_quality(rows) -> float | None:
    pairs = [(w.quality, w.n) for w in rows if w.quality is not None]
    total = sum(n for _, n in pairs)
    return sum(q * n for q, n in pairs) / total if total else None


def run_worker(loop: Loop, once: bool = False, stop=None) -> None:
    """`tunegate worker`: a pass every `loop.interval_s` until `stop()` is true (or once)."""
    while True:
        started = time.monotonic()
        try:
            found = loop.tick()
            log.info("loop pass: %s", json.dumps(found, default=str)[:2000])
        except Exception:
            if once:
                raise  # `worker --once` says so in its exit code
            log.exception("loop pass failed")
        if once or (stop is not None and stop()):
            return
        time.sleep(max(0.0, loop.settings.loop.interval_s - (time.monotonic() - started)))
