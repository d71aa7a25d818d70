"""The gate: a candidate adapter version against the route's active version, item by item, through vLLM.

Both versions answer the route's current test set and its frozen holdout through the same vLLM server
that serves live traffic (greedy, the same chat template; the caller passes `answer`, which asks vLLM).
The candidate passes when, all three:

1. the test set has at least the items a power calculation asks for (`stats.required_pairs` at the
   settings' level, power, smallest effect worth detecting and expected discordance); below that the
   gate answers `not_enough_evidence` and the candidate waits for more labels;
2. it is better on the test set by a paired test: exact McNemar (one-sided p < alpha), or the lower
   bound of the paired bootstrap interval above 0 (`loop.gate.method`);
3. it is no worse on the holdout than `loop.gate.holdout_margin` (non-inferiority: the one-sided lower
   bound of the paired difference above -margin).

The decision and every number behind it are one `eval_runs` row (kind `gate`, its `summary` is the
promotion record, plus `eval_metrics`), and the candidate moves to `gated` or `rejected` with the record
as the audit row's evidence. Imports `core` and `evalsuite`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy.orm import Session

from core.db import Adapter, EvalMetric, EvalRun, utcnow
from core.io import normalise_answer
from core.lifecycle import audit, transition, version_label
from core.loop_settings import GateSettings
from core.vocab import AdapterStatus, DatasetKind, EvalKind, EvalStatus
from evalsuite import stats, testsets

# (model name as vLLM serves it, conversations) -> greedy answers in order.
Answer = Callable[[str, Sequence[list[dict]]], list[str]]


class GateDecision(StrEnum):
    PASSED = "passed"
    REJECTED = "rejected"
    NOT_ENOUGH_EVIDENCE = "not_enough_evidence"


@dataclass
class GateRecord:
    """The promotion record: what was compared, on what, and every number the decision rests on."""

    decision: GateDecision
    reasons: list[str]
    route: str
    candidate: str
    baseline: str
    test_version: int | None
    required_items: int
    test: dict
    holdout: dict
    eval_run_id: int | None = None

    def to_dict(self) -> dict:
        return {**self.__dict__, "decision": self.decision.value}


def correctness(answer: Answer, model: str, items: Sequence[testsets.TestItem]) -> list[bool]:
    """Whether `model`'s greedy answer to each item equals the gold answer (normalised)."""
    if not items:
        return []
    answers = answer(model, [i.prompt for i in items])
    return [normalise_answer(a) == normalise_answer(i.answer) for a, i in zip(answers, items, strict=True)]


def _test_verdict(cand: list[bool], base: list[bool], settings: GateSettings) -> tuple[bool, dict]:
    paired = stats.mcnemar_exact(cand, base).to_dict()
    interval = stats.paired_bootstrap(cand, base, confidence=1 - 2 * settings.alpha).to_dict()
    if settings.method == "mcnemar":
        better = paired["p_value"] < settings.alpha and paired["difference"] > 0
    else:
        better = interval["low"] > 0
    return better, {**paired, "bootstrap": interval, "alpha": settings.alpha, "method": settings.method}


def run_gate(
    session: Session,
    route: str,
    candidate: Adapter,
    candidate_model: str,
    baseline: Adapter | None,
    baseline_model: str,
    answer: Answer,
    settings: GateSettings,
    actor: str = "loop",
) -> GateRecord:
    """Evaluate, decide, store the record and move the candidate (see the module docstring)."""
    test_items = testsets.items(session, route, DatasetKind.TEST)
    holdout_items = testsets.items(session, route, DatasetKind.HOLDOUT)
    required = stats.required_pairs(settings.alpha, settings.power, settings.min_effect, settings.expected_discordance)
    record = GateRecord(
        GateDecision.NOT_ENOUGH_EVIDENCE,
        [],
        route,
        version_label(candidate),
        version_label(baseline),
        testsets.current_version(session, route),
        required,
        {"n": len(test_items)},
        {"n": len(holdout_items)},
    )
    if len(test_items) < required:
        record.reasons.append(f"the test set has {len(test_items)} items; the power calculation asks for {required}")
    if not holdout_items:
        record.reasons.append("the holdout is empty")
    if not record.reasons:
        test_ok, record.test = _test_verdict(
            correctness(answer, candidate_model, test_items), correctness(answer, baseline_model, test_items), settings
        )
        cand_h = correctness(answer, candidate_model, holdout_items)
        base_h = correctness(answer, baseline_model, holdout_items)
        holdout = stats.non_inferior(cand_h, base_h, settings.holdout_margin)
        record.holdout = {
            **holdout.to_dict(),
            "n": len(holdout_items),
            "candidate_accuracy": sum(cand_h) / len(cand_h),
            "baseline_accuracy": sum(base_h) / len(base_h),
        }
        if not test_ok:
            record.reasons.append("not better than the active version on the test set")
        if not holdout.passed:
            record.reasons.append(f"worse on the holdout by more than the margin {settings.holdout_margin}")
        record.decision = GateDecision.PASSED if test_ok and holdout.passed else GateDecision.REJECTED
    _store(session, record, candidate, actor)
    return record


def _store(session: Session, record: GateRecord, candidate: Adapter, actor: str) -> None:
    now = utcnow()
    run = EvalRun(
        kind=EvalKind.GATE,
        adapter_id=candidate.id,
        status=EvalStatus.SUCCEEDED,
        started_at=now,
        finished_at=now,
        summary=record.to_dict(),
    )
    session.add(run)
    session.flush()
    record.eval_run_id = run.id
    run.summary = record.to_dict()
    numbers = {
        "test_candidate_accuracy": record.test.get("candidate_accuracy"),
        "test_baseline_accuracy": record.test.get("baseline_accuracy"),
        "test_p_value": record.test.get("p_value"),
        "holdout_difference": record.holdout.get("difference"),
        "holdout_lower_bound": record.holdout.get("lower_bound"),
    }
    n = record.test.get("n")
    session.add_all(
        EvalMetric(eval_run_id=run.id, name=k, value=float(v), n=n) for k, v in numbers.items() if v is not None
    )
    evidence = {"eval_run_id": run.id, "decision": record.decision.value, "reasons": record.reasons}
    if record.decision is GateDecision.PASSED:
        transition(session, candidate, AdapterStatus.GATED, actor, "passed the gate", evidence)
    elif record.decision is GateDecision.REJECTED:
        transition(session, candidate, AdapterStatus.REJECTED, actor, "; ".join(record.reasons), evidence)
    else:
        audit(session, actor, "gate.waiting", "adapter", candidate.id, {"version": record.candidate, **evidence})
    session.flush()
