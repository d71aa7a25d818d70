"""The demo's story, phase by phase: traffic and reviewers (`tunegate.demo_traffic`) on one side, the
loop's passes (`tunegate.loop.Loop.tick`, what a worker runs) on the other, and at the end the ground
truth's measurement of what the route knows. `tunegate.demo` sets the stage and prints the results.
"""

from __future__ import annotations

import random
import time

import sqlalchemy as sa
from rich.console import Console

from core.db import Adapter, EvalRun, Request, ReviewItem, Rollout, session_scope
from core.io import normalise_answer
from core.lifecycle import route_table
from core.settings import Settings
from core.vllm import chat_greedy
from core.vocab import AdapterStatus, DatasetKind, EvalKind, ReviewStatus
from evalsuite import testsets, triggers
from training.domain import Domain, Fact
from tunegate.demo_traffic import DemoWorld
from tunegate.loop import Loop, served_name

MAX_CANARY_ROUNDS = 12


class DemoLoop:
    def __init__(
        self,
        settings: Settings,
        vllm_url: str,
        domain: Domain,
        console: Console,
        route: str,
        n_reviewed: int,
        started: float,
    ) -> None:
        self.s, self.url, self.domain, self.console, self.route = settings, vllm_url, domain, console, route
        self.rng = random.Random(settings.seed)
        self.reviewed_facts = domain.new_facts[:n_reviewed]
        self.unreviewed_facts = domain.new_facts[n_reviewed:]
        self.old_sample = self.rng.sample(domain.old_facts, 100)  # the same old facts before and after
        self.loop = Loop(settings, vllm_url)
        # The base model's own training data, replayed beside the reviewed labels (its pre-training set).
        self.loop.replay[route] = domain.qa_examples(domain.old_facts)
        self.report: dict = {}
        self.started = started
        self.world: DemoWorld | None = None

    # --- measurement (ground truth) -------------------------------------------------------------

    def accuracy(self, model: str, questions: list[tuple[str, str]]) -> float:
        answers = chat_greedy(self.url, model, [[{"role": "user", "content": q}] for q, _ in questions])
        hits = sum(normalise_answer(a) == normalise_answer(t) for a, (_, t) in zip(answers, questions, strict=True))
        return round(hits / max(len(questions), 1), 4)

    def heldout(self, facts: list[Fact]) -> list[tuple[str, str]]:
        return [(q, f.answer) for f in facts for q in f.heldout_questions]

    def unseen(self, facts: list[Fact]) -> list[tuple[str, str]]:
        return [(f.unseen_question, f.answer) for f in facts]

    def holdout(self) -> list[tuple[str, str]]:
        with self.loop.sessions() as session:
            return [(i.question, i.answer) for i in testsets.items(session, self.route, DatasetKind.HOLDOUT)]

    def measure(self, model: str, when: str) -> dict:
        return {
            f"old_{when}": self.accuracy(model, self.heldout(self.old_sample)),
            f"drift_{when}": self.accuracy(model, self.heldout(self.reviewed_facts)),
            f"unseen_{when}": self.accuracy(model, self.unseen(self.reviewed_facts)),
            f"unreviewed_{when}": self.accuracy(model, self.heldout(self.unreviewed_facts)),
        }

    # --- the story ------------------------------------------------------------------------------

    def rule(self, title: str) -> None:
        """A chapter of the story, with the time since the demo began (also kept in the report)."""
        elapsed = round(time.perf_counter() - self.started, 1)
        self.report.setdefault("chapter_started_s", {})[title.split(".")[0]] = elapsed
        self.console.rule(f"{elapsed:.0f} s · {title}")

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def traffic(self, questions: list[tuple[str, str]], title: str) -> dict:
        assert self.world is not None
        asked = self.world.ask(questions)
        reviewed = self.world.review()
        delivered = self.world.deliver()
        self.world.settle()
        self.say(
            f"{title}: {asked.asked} questions, decisions {dict(asked.decisions)}; reviewers approved "
            f"{reviewed.approved}, corrected {reviewed.corrected} ({dict(reviewed.by_reason)}); "
            f"{delivered} held clients received the reviewed answer"
        )
        return {"asked": asked.to_dict(), "reviewed": reviewed.to_dict()}

    def tick(self) -> dict:
        """A worker's turn (`Loop.tick`), told: each job it ran, in order."""
        found = self.loop.tick(force=True)
        for job in found["jobs"]:
            if job["kind"] == triggers.TRAIN_JOB:
                self.say(
                    f"  training job {job['job_id']}: trained {job.get('version')} on {job.get('train_rows')} rows "
                    f"({job.get('contaminated_removed')} removed as test contamination)"
                )
            else:
                self.say("  loop pass: " + "; ".join(self.describe_pass(job)))
        return found

    def describe_pass(self, found: dict) -> list[str]:
        r = self.route
        assign, drift = found.get(f"{r}.assign", {}), found.get(f"{r}.drift") or {}
        bits = [
            f"labels +{assign.get('train', 0)} train / +{assign.get('test', 0)} test / "
            f"+{assign.get('holdout', 0)} holdout",
            f"scored {found.get('score', {}).get('inserted', 0)}",
        ]
        if drift:
            parts = drift["drift"]
            bits.append(
                f"drift: risk {parts['risk']['method']} drifted={parts['risk']['drifted']}, flag rate "
                f"drifted={parts['flag_rate']['drifted']}, inputs AUROC {parts['embedding'].get('auroc')}"
            )
        trig = found.get(f"{r}.trigger", {})
        if trig.get("fire"):
            bits.append(f"TRIGGER: {'; '.join(trig['reasons'])} -> training job {trig['job_id']} {trig['counts']}")
        for g in found.get(f"{r}.gate", []):
            bits.append(
                f"GATE {g['candidate']} vs {g['baseline']}: {g['decision']} (test "
                f"{g['test'].get('candidate_accuracy')} vs {g['test'].get('baseline_accuracy')}, "
                f"p={g['test'].get('p_value')}, n={g['test'].get('n')}/{g['required_items']} needed; "
                f"holdout diff {g['holdout'].get('difference')}){' ' + '; '.join(g['reasons']) if g['reasons'] else ''}"
            )
        if canary := found.get(f"{r}.canary") or []:
            bits.append(f"canary: {', '.join(canary)}")
        return bits

    def run(self) -> dict:
        r = self.report
        with DemoWorld(self.s, self.domain, self.route) as world:
            self.world = world
            self.rule("2. before the drift: reviewers fill the frozen holdout")
            base = self.s.base_model.served_name
            before = self.measure(base, "before")
            r["phase_before"] = self.traffic(_old_traffic(self.domain, 200, self.rng), "old-tariff traffic")
            self.tick()

            self.rule("3. the drift arrives: the guardrails hold, reviewers correct")
            first_label = time.perf_counter()
            for wave, phrasings in enumerate(([0, 1], [2, 3]), start=1):
                questions = _wave(self.reviewed_facts, phrasings, self.domain.old_facts, 20, self.rng, f"w{wave}")
                r[f"wave_{wave}"] = self.traffic(questions, f"wave {wave}")
                self.tick()

            self.rule("4. train, gate, canary, while traffic flows")
            promoted = r["promoted"] = self.canary_rounds("good candidate")
            r["loop_seconds"] = round(time.perf_counter() - first_label, 1)
            good = self.adapter_of_last_job()
            r["gate"] = self.gate_record(good)
            r["canary_steps"] = self.canary_history(good)
            if not promoted:
                self.say("[bold red]the candidate was not promoted[/]")

            self.rule("5. a bad candidate (answers shuffled), the same path")
            self.file_corrupted_job()
            self.canary_rounds("bad candidate")
            bad = self.adapter_of_last_job()
            r["bad_candidate_outcome"] = {
                AdapterStatus.REJECTED: "rejected_at_gate",
                AdapterStatus.ROLLED_BACK: "rolled_back",
            }.get(bad.status, bad.status)
            r["bad_candidate_gate"] = self.gate_record(bad)
            r["bad_candidate_max_share"] = max([s["weight"] for s in self.canary_history(bad)] or [0.0])
            self.rule("6. the measurement (ground truth)")
            after_model = served_name(good, base) if good.status == AdapterStatus.ACTIVE else base
            after = self.measure(after_model, "after")
            holdout = self.holdout()
            r["accuracy"] = {
                "accuracy_before_drift": before["old_before"],
                "accuracy_old_facts_after": after["old_after"],
                "accuracy_on_drift_before_retrain": before["drift_before"],
                "accuracy_on_drift_after_retrain": after["drift_after"],
                "accuracy_on_unreviewed_drift_before": before["unreviewed_before"],
                "accuracy_on_unreviewed_drift_after": after["unreviewed_after"],
                "accuracy_unseen_template_before": before["unseen_before"],
                "accuracy_unseen_template_after": after["unseen_after"],
                "holdout_accuracy_before": self.accuracy(base, holdout),
                "holdout_accuracy_after": self.accuracy(after_model, holdout),
            }
            r.update(self.counts())
            r["loop_report"] = self.write_report()
        return r

    def canary_rounds(self, label: str) -> bool:
        """Traffic in rounds with a worker's turn after each, until the newest candidate is promoted
        (True) or stopped: rejected at the gate or rolled back (False)."""
        for round_ in range(MAX_CANARY_ROUNDS):
            status = self.status_of_last_candidate()
            if status in (AdapterStatus.ACTIVE, AdapterStatus.REJECTED, AdapterStatus.ROLLED_BACK):
                break
            facts = self.rng.sample(self.reviewed_facts, 30)
            tag = f"c{label[:3]}{round_}"
            self.traffic(_wave(facts, [self.rng.randrange(4)], self.domain.old_facts, 30, self.rng, tag),
                         f"traffic round {round_ + 1}")  # fmt: skip
            self.tick()
        return self.status_of_last_candidate() == AdapterStatus.ACTIVE

    def status_of_last_candidate(self) -> str | None:
        """The status of the adapter the newest training job produced (None while it has not run)."""
        with self.loop.sessions() as session:
            job = triggers.training_jobs(session, self.route)[0]
            adapter_id = (job.result or {}).get("adapter_id")
            return None if adapter_id is None else session.get_one(Adapter, adapter_id).status

    def adapter_of_last_job(self) -> Adapter:
        with self.loop.sessions() as session:
            job = triggers.training_jobs(session, self.route)[0]
            return session.get_one(Adapter, (job.result or {})["adapter_id"])

    def gate_record(self, adapter: Adapter) -> dict | None:
        with self.loop.sessions() as session:
            run = session.scalars(
                sa.select(EvalRun)
                .where(EvalRun.kind == EvalKind.GATE, EvalRun.adapter_id == adapter.id)
                .order_by(EvalRun.id.desc())
            ).first()
            return None if run is None else run.summary

    def canary_history(self, adapter: Adapter) -> list[dict]:
        with self.loop.sessions() as session:
            rollout = session.scalars(sa.select(Rollout).where(Rollout.candidate_id == adapter.id)).first()
            if rollout is None:
                return []
            return [
                {
                    "step": h.get("step"),
                    "weight": h.get("weight"),
                    "passed": h.get("passed"),
                    "reasons": h.get("reasons"),
                }
                for h in rollout.history
            ]

    def file_corrupted_job(self) -> None:
        with session_scope(self.loop.sessions) as session:
            labels = testsets.training_labels(session, self.route)
            answers = [row["messages"][-1]["content"] for row in labels]
            answers = answers[1:] + answers[:1]  # every question gets another question's answer
            corrupted = [
                {"messages": [*row["messages"][:-1], {"role": "assistant", "content": a}]}
                for row, a in zip(labels, answers, strict=True)
            ]
            rows, counts = triggers.snapshot_rows(session, self.route, self.loop.replay[self.route], [], self.s.loop)
            honest = [{"messages": row["messages"]} for row in labels]
            rows = corrupted + [r for r in rows if r not in honest]
            decision = triggers.TriggerDecision(self.route, True, ["demo: corrupted labels (answers shuffled)"])
            job = triggers.file_training_job(
                session, decision, rows, counts | {"corrupted": len(corrupted)}, self.loop.snapshot_dir, actor="demo"
            )
        self.say(f"filed training job {job.id} on {len(rows)} rows, {len(corrupted)} of them corrupted labels")

    def counts(self) -> dict:
        with self.loop.sessions() as session:
            flagged = session.scalar(sa.select(sa.func.count()).where(Request.decision.in_(["hold", "block"])))
            reviewed = session.scalar(sa.select(sa.func.count()).where(ReviewItem.status == ReviewStatus.DECIDED))
            job = next(j for j in triggers.training_jobs(session, self.route) if "corrupted" not in j.payload["counts"])
            targets = route_table(session)[self.route]
        return {
            "flagged": int(flagged or 0),
            "reviewed": int(reviewed or 0),
            "labels_used": job.payload["counts"]["reviewed_labels"],
            "training_rows": job.payload["rows"],
            "route_now": [{"version": t.label, "status": t.status, "weight": t.weight} for t in targets],
        }

    def write_report(self) -> str:
        from evalsuite.report import write_report

        out = self.s.var_dir.parent / "loop-report"
        with self.loop.sessions() as session:
            return str(write_report(session, out).html_path)


def _old_traffic(domain: Domain, n: int, rng: random.Random) -> list[tuple[str, str]]:
    facts = rng.sample(domain.old_facts, n)
    return [(f"before-{i}", rng.choice(f.train_questions)) for i, f in enumerate(facts)]


def _wave(facts, phrasings, old, n_old, rng, tag):
    asked = [(f"{tag}-{i}", f.train_questions[p]) for p in phrasings for i, f in enumerate(facts)]
    asked += [(f"{tag}-old-{i}", rng.choice(f.train_questions)) for i, f in enumerate(rng.sample(old, n_old))]
    rng.shuffle(asked)
    return asked
