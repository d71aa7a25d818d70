"""Guardrails: each detector on small literal examples, unknown handling, the registry, calibration
(round trip, monotone weights, held-out separation of the embedded grounding set), the policy, the
guard, retrieval and the commands. Fast: no vLLM, no downloads (the embedding model ships in a package).
"""

from __future__ import annotations

import json
import math
import random

import pytest

from core.settings import GuardrailSettings, PolicySettings
from guardrails.calibration import (
    Calibration,
    CalibrationError,
    DefaultCombination,
    best_threshold,
    feature_vector,
    rows_from_reviews,
)
from guardrails.detectors.consistency import consistency
from guardrails.detectors.grounding import grounding
from guardrails.detectors.uncertainty import uncertainty
from guardrails.guard import Guard, check_input, fit_calibration
from guardrails.policy import decide
from guardrails.registry import Registry, RegistryError, build_detectors, default_registry
from guardrails.retrieval import KnowledgeBase
from guardrails.text import numbers, sentences, stem
from guardrails.types import CheckInput, DetectorResult

CONTEXT = (
    "Tariff T417 is offered in the Northvale region. Tariff T417 has a monthly standing charge of 12.40 EUR. "
    "Energy on tariff T417 costs 0.213 EUR/kWh. Tariff T417 has a minimum contract term of 12 months."
)


def inp(answer: str, context: str | None = CONTEXT, question: str = "Tell me about tariff T417.", **kw) -> CheckInput:
    return CheckInput(question=question, answer=answer, context=context, **kw)


# --- types -------------------------------------------------------------------------------------------


def test_detector_result_refuses_nan_and_out_of_range_scores():
    with pytest.raises(ValueError, match="NaN"):
        DetectorResult("x", math.nan)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DetectorResult("x", 1.5)
    unknown = DetectorResult.unknown("x", "no context")
    assert unknown.score is None and not unknown.known and unknown.evidence["reason"] == "no context"
    assert json.loads(json.dumps(unknown.to_dict()))["score"] is None


# --- text --------------------------------------------------------------------------------------------


def test_text_helpers_stem_split_and_read_numbers_with_units():
    assert stem("charges") == stem("charge") == stem("charged")
    assert stem("offered") == stem("offer")
    assert [(n.value, n.unit) for n in numbers("It costs 12.40 EUR for 12 months, 1,200 kWh, €5 or 45%.")] == [
        (12.4, "eur"),
        (12.0, "months"),
        (1200.0, "kwh"),
        (5.0, "eur"),
        (45.0, "%"),
    ]
    text = "Arthur was born.First for Women is a magazine. It costs 12.5 EUR!"
    assert [text[a:b] for a, b in sentences(text)] == [
        "Arthur was born.",
        "First for Women is a magazine.",
        "It costs 12.5 EUR!",
    ]


# --- grounding ---------------------------------------------------------------------------------------


def test_grounding_supported_answer_scores_low():
    r = grounding(inp("The monthly standing charge of T417 is 12.40 EUR."))
    assert r.score == pytest.approx(0.0) and r.unsupported_spans == []
    assert r.evidence["numbers"] == 1 and r.evidence["unsupported_numbers"] == 0


def test_grounding_wrong_number_is_flagged_with_its_span():
    answer = "The monthly standing charge of T417 is 15.20 EUR."
    r = grounding(inp(answer))
    assert r.score >= 0.99
    assert [answer[a:b] for a, b in r.unsupported_spans] == ["15.20"]


def test_grounding_number_needs_the_same_unit():
    # 12 appears in the context as "12 months"; "12 EUR" is not supported, "12 months" is.
    assert grounding(inp("The standing charge is 12 EUR.")).evidence["unsupported_numbers"] == 1
    assert grounding(inp("The contract term is 12 months.")).evidence["unsupported_numbers"] == 0


def test_grounding_unsupported_entity_and_words():
    answer = "Tariff T417 is offered in Kestrel Bay."
    r = grounding(inp(answer))
    assert r.score > 0.5 and r.evidence["unsupported_entities"] == 1
    assert "Kestrel Bay" in [answer[a:b] for a, b in r.unsupported_spans]
    wrong_code = grounding(inp("Tariff T999 is offered in Northvale."))
    assert wrong_code.score > 0.5


def test_grounding_counts_on_a_log_scale_keep_growing_where_the_saturating_count_stops():
    logs = ("unsupported_log", "numbers_log", "entities_log", "worst_sentence_log")
    supported = grounding(inp("The monthly standing charge of T417 is 12.40 EUR.")).evidence["features"]
    assert all(supported[k] == 0.0 for k in logs)
    invented = [f"Zorbic{i} glimmers near Quux{i} at {i}.5 kelvin." for i in range(1, 9)]
    few, many = (grounding(inp(" ".join(invented[:n]))).evidence["features"] for n in (2, 8))
    assert few["count"] == pytest.approx(many["count"], abs=1e-3)  # saturated: 8 sentences look like 2
    assert all(0.0 < few[k] < many[k] <= 1.0 for k in ("unsupported_log", "numbers_log", "entities_log"))
    assert few["worst_sentence_log"] == pytest.approx(many["worst_sentence_log"])  # the worst sentence alone


def test_grounding_stitched_facts_raise_scatter():
    context = "Cooking Light is a food magazine founded in 1987. Hot Rod is a car magazine from Los Angeles."
    right = grounding(inp("Cooking Light was founded in 1987.", context, "Which magazine was founded in 1987?"))
    stitched = grounding(inp("Hot Rod was founded in 1987.", context, "Which magazine was founded in 1987?"))
    assert right.evidence["features"]["scatter"] == 0.0
    assert stitched.evidence["features"]["scatter"] > 0.3 and stitched.score > right.score


def test_grounding_unknown_without_context_and_zero_with_nothing_to_check():
    assert grounding(inp("Anything.", context=None)).score is None
    assert grounding(inp("Anything.", context="   ")).score is None
    r = grounding(inp("Yes."))
    assert r.score == 0.0 and r.evidence["checked"] == 0


# --- uncertainty -------------------------------------------------------------------------------------


def test_uncertainty_confident_vs_unsure_and_unknown():
    sure = uncertainty(inp("x", token_logprobs=[-0.01, -0.02, -0.005]))
    unsure = uncertainty(inp("x", token_logprobs=[-2.0, -1.5, -3.0]))
    assert sure.score < 0.05 < 0.8 < unsure.score
    assert unsure.evidence["features"]["low_share"] == 1.0
    assert uncertainty(inp("x")).score is None
    assert uncertainty(inp("x", token_logprobs=[float("nan"), None])).score is None
    with_inf = uncertainty(inp("x", token_logprobs=[-0.1, float("-inf")]))
    assert 0.9 < with_inf.score <= 1.0  # a zero-probability token: finite and maximal, not NaN


def test_uncertainty_entropy_from_top_logprobs():
    peaked = [{"a": math.log(0.98), "b": math.log(0.01)}]
    flat = [{"a": math.log(0.34), "b": math.log(0.33), "c": math.log(0.33)}]
    p = uncertainty(inp("x", token_logprobs=[-0.02], top_logprobs=peaked)).evidence["features"]["entropy"]
    f = uncertainty(inp("x", token_logprobs=[-1.1], top_logprobs=flat)).evidence["features"]["entropy"]
    assert p < 0.2 < 0.7 < f
    only_top = uncertainty(inp("x", top_logprobs=flat))
    assert only_top.score == pytest.approx(f)


# --- consistency -------------------------------------------------------------------------------------


def test_consistency_agreement_and_unknown():
    agree = consistency(inp("Northvale", samples=["northvale.", "The Northvale", "Northvale"]))
    disagree = consistency(inp("Northvale", samples=["Eastmoor", "Southbay region", "Glenrock"]))
    assert agree.score == pytest.approx(0.0) and agree.evidence["exact_match"] == 1.0
    assert disagree.score == pytest.approx(1.0)
    partial = consistency(inp("12.40 EUR a month", samples=["12.40 EUR", "12.40 EUR per month"]))
    assert 0.0 < partial.score < 0.5
    assert consistency(inp("x", samples=["x"])).score is None
    assert consistency(inp("x")).score is None


# --- registry ----------------------------------------------------------------------------------------


def test_registry_duplicate_and_unknown_names_are_errors():
    registry = Registry()
    registry.register("grounding", lambda s: grounding)
    with pytest.raises(RegistryError, match="already registered"):
        registry.register("grounding", lambda s: grounding)
    with pytest.raises(RegistryError, match="unknown detector `nope`"):
        build_detectors(GuardrailSettings(detectors=["nope"]), registry)
    assert default_registry().names() == [
        "grounding",
        "embedding",
        "uncertainty",
        "consistency",
        "nli",
        "grounding_model",
        "judge",
    ]


def test_build_detectors_in_order_and_checks_what_they_need():
    detectors = build_detectors(GuardrailSettings(detectors=["uncertainty", "grounding", "consistency"]))
    assert list(detectors) == ["uncertainty", "grounding", "consistency"]
    assert detectors["grounding"](inp("Northvale")).name == "grounding"
    with pytest.raises(RegistryError, match="nli_model_path"):
        build_detectors(GuardrailSettings(detectors=["nli"]))
    with pytest.raises(RegistryError, match="judge_url"):
        build_detectors(GuardrailSettings(detectors=["judge"]))
    with pytest.raises(RegistryError, match="twice"):
        build_detectors(GuardrailSettings(detectors=["grounding", "grounding"]))


# --- policy ------------------------------------------------------------------------------------------


def test_policy_thresholds():
    policy = PolicySettings(annotate_at=0.3, hold_at=0.6, block_at=0.9)
    assert [decide(r, policy) for r in (0.0, 0.29, 0.3, 0.59, 0.6, 0.89, 0.9, 1.0)] == [
        "allow",
        "allow",
        "annotate",
        "annotate",
        "hold",
        "hold",
        "block",
        "block",
    ]
    assert decide(1.0, PolicySettings()) == "hold"  # block_at 1.01: blocking switched off
    for bad in (math.nan, -0.1, 1.1, None):
        with pytest.raises(ValueError, match="risk"):
            decide(bad, policy)


# --- calibration -------------------------------------------------------------------------------------


def _toy(n: int = 200, seed: int = 0):
    rng = random.Random(seed)
    vectors, labels = [], []
    for i in range(n):
        y = i % 2 == 0
        g = min(1.0, max(0.0, rng.gauss(0.7 if y else 0.2, 0.15)))
        e = min(1.0, max(0.0, rng.gauss(0.5, 0.2)))
        u = None if rng.random() < 0.5 else min(1.0, max(0.0, rng.gauss(0.6 if y else 0.3, 0.2)))
        vectors.append({"grounding": g, "grounding.number": float(y and rng.random() < 0.5), "embedding": e,
                        "uncertainty": u})  # fmt: skip
        labels.append(y)
    return vectors, labels


def test_calibration_round_trip_and_risk(tmp_path):
    vectors, labels = _toy()
    cal = Calibration.fit(vectors, labels, source="toy")
    path = cal.save(tmp_path / "sub" / "calibration.json")
    loaded = Calibration.load(path)
    assert loaded == cal
    assert [loaded.risk_of_vector(v) for v in vectors] == [cal.risk_of_vector(v) for v in vectors]
    assert cal.trained_on["rows"] == 200 and cal.trained_on["balanced_accuracy"] > 0.85
    assert 0.0 < cal.threshold < 1.0
    assert [p.name for p in tmp_path.glob("sub/*")] == ["calibration.json"]  # written atomically, no temp left


def test_calibration_handles_unknowns_explicitly():
    vectors, labels = _toy()
    for v in vectors:
        v["judge"] = None  # never known in training
    cal = Calibration.fit(vectors, labels)
    assert cal.unseen == ["judge"] and "judge" not in cal.features
    # unknown at inference: imputed + indicator; never NaN
    for vector in ({}, {"grounding": None}, {"grounding": math.nan}, {"grounding": 0.9, "judge": 0.1}):
        risk = cal.risk_of_vector(vector)
        assert 0.0 <= risk <= 1.0 and not math.isnan(risk)
    results = [
        DetectorResult("grounding", 0.9, {"features": {"number": 1.0}}),
        DetectorResult.unknown("embedding", "-"),
    ]
    assert feature_vector(results) == {"grounding": 0.9, "grounding.number": 1.0, "embedding": None}
    assert cal.risk(results) > cal.risk([DetectorResult("grounding", 0.05, {"features": {"number": 0.0}})])


def test_calibration_prunes_a_detector_that_adds_no_accuracy_and_keeps_those_that_do():
    rng = random.Random(3)
    vectors, labels = [], []
    for _ in range(400):
        y = rng.random() < 0.5
        g = min(1.0, max(0.0, rng.gauss(0.7 if y else 0.3, 0.15)))
        e = min(1.0, max(0.0, rng.gauss(0.6 if y else 0.4, 0.15)))  # weaker, independent signal
        vectors.append({"grounding": g, "embedding": e, "noise": rng.random(), "noise.part": rng.random()})
        labels.append(y)
    cal = Calibration.fit(vectors, labels)
    assert cal.pruned == ["noise"] and cal.trained_on["pruned"] == ["noise"]
    assert not cal.weighs("noise") and cal.weighs("grounding") and cal.weighs("embedding")
    assert not any(f.startswith("noise") for f in cal.features)
    unpruned = Calibration.fit(vectors, labels, prune=False)
    assert unpruned.pruned == [] and "noise" in {f.split(".")[0] for f in unpruned.features}
    assert Calibration.fit(vectors[:40], labels[:40]).pruned == []  # too few rows to judge
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_calibration_is_monotone():
    vectors, labels = _toy()
    for v, y in zip(vectors, labels, strict=True):
        v["inverted"] = 0.2 if y else 0.8  # a "risk" that is lower on hallucinations
    cal = Calibration.fit(vectors, labels, prune=False)  # the constraint itself (pruning would also drop it)
    n = len(cal.features)
    assert all(c >= 0 for c in cal.coef[:n]) and "inverted" in cal.dropped
    assert not Calibration.fit(vectors, labels).weighs("inverted")


def test_calibration_rejects_bad_files_and_sets(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CalibrationError, match="cannot read"):
        Calibration.load(bad)
    bad.write_text(json.dumps({"version": 99}))
    with pytest.raises(CalibrationError, match="version"):
        Calibration.load(bad)
    with pytest.raises(CalibrationError, match="both"):
        Calibration.fit([{"grounding": 0.1}, {"grounding": 0.2}], [True, True])


def test_best_threshold_splits_a_clean_gap():
    assert best_threshold([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == pytest.approx(0.5)


def test_default_combination_weights_known_scores_only():
    combo = DefaultCombination()
    assert combo.risk([]) == 0.5
    assert combo.risk([DetectorResult("grounding", 1.0), DetectorResult.unknown("embedding", "-")]) == 1.0
    mixed = combo.risk([DetectorResult("grounding", 0.0), DetectorResult("embedding", 1.0)])
    assert mixed == pytest.approx(0.15 / 0.75)


def test_rows_from_reviews():
    rows = rows_from_reviews(
        [
            {"question": "q1", "context": "c", "answer": "a1", "verdict": "approve", "token_logprobs": [-0.1]},
            {"question": "q2", "context": "c", "answer": "a2", "verdict": "reject"},
            {"question": "q3", "context": "c", "answer": "a3", "verdict": "edit", "corrected_answer": "fixed"},
        ]
    )
    assert [(r["answer"], r["hallucinated"]) for r in rows] == [
        ("a1", False),
        ("a2", True),
        ("a3", True),
        ("fixed", False),
    ]
    assert rows[0]["knowledge"] == "c" and rows[0]["token_logprobs"] == [-0.1] and "token_logprobs" not in rows[1]
    assert check_input(rows[0]).token_logprobs == [-0.1]
    with pytest.raises(CalibrationError, match="verdict"):
        rows_from_reviews([{"question": "q", "answer": "a", "verdict": "maybe"}])


# --- guard -------------------------------------------------------------------------------------------


def test_guard_turns_a_crashing_detector_into_unknown_and_uses_the_default_without_a_file(tmp_path):
    def broken(_: CheckInput) -> DetectorResult:
        raise RuntimeError("boom")

    guard = Guard(GuardrailSettings(), tmp_path / "missing.json", detectors={"grounding": grounding, "x": broken})
    assert isinstance(guard.risk_model, DefaultCombination)
    verdict = guard.check(inp("Tariff T417 is offered in Northvale."))
    assert verdict.unknown == ["x"] and "boom" in verdict.results["x"].evidence["reason"]
    assert verdict.risk < 0.2 and verdict.total_ms > 0
    assert json.loads(json.dumps(verdict.to_dict()))["results"]["grounding"]["score"] == 0.0


def test_guard_loads_a_calibration_file_and_fails_loudly_on_a_broken_one(tmp_path):
    vectors, labels = _toy()
    path = Calibration.fit(vectors, labels).save(tmp_path / "c.json")
    guard = Guard(GuardrailSettings(calibration_path=path), detectors={"grounding": grounding})
    assert isinstance(guard.risk_model, Calibration)
    (tmp_path / "broken.json").write_text("[]")
    with pytest.raises(CalibrationError):
        Guard(GuardrailSettings(), tmp_path / "broken.json", detectors={"grounding": grounding})


@pytest.fixture(scope="module")
def grounding_rows():
    from training.domain import Domain

    return Domain().grounding_rows()


def test_calibrated_guard_separates_held_out_embedded_grounding_set(grounding_rows):
    from guardrails.detectors.embedding import EmbeddingDetector

    codes = sorted({r["key"].split("/")[0] for r in grounding_rows})
    random.Random(0).shuffle(codes)
    train_codes = set(codes[: len(codes) // 2])
    train = [r for r in grounding_rows if r["key"].split("/")[0] in train_codes]
    test = [r for r in grounding_rows if r["key"].split("/")[0] not in train_codes]
    detectors = {"grounding": grounding, "embedding": EmbeddingDetector(), "uncertainty": uncertainty}
    cal = fit_calibration(train, detectors, source="train half")
    guard = Guard(detectors=detectors, risk_model=cal)
    predicted = [guard.check(check_input(r)).risk >= cal.threshold for r in test]
    labels = [r["hallucinated"] for r in test]
    tpr = sum(p and y for p, y in zip(predicted, labels, strict=True)) / sum(labels)
    tnr = sum(not p and not y for p, y in zip(predicted, labels, strict=True)) / (len(labels) - sum(labels))
    assert (tpr + tnr) / 2 > 0.85
    assert "uncertainty" in cal.unseen  # no logprobs in the set: no weight, explicitly


# --- retrieval ---------------------------------------------------------------------------------------


def test_retrieval_finds_the_passage(tmp_path):
    from training.domain import Domain

    domain = Domain()
    path = tmp_path / "kb.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in domain.knowledge_base.values()))
    kb = KnowledgeBase.from_jsonl(path)
    facts = domain.facts[::7]
    hits = [kb.search(q, k=1)[0].text == domain.knowledge_base[f.code] for f in facts for q in f.heldout_questions]
    assert sum(hits) / len(hits) > 0.95
    assert kb.search("zzz qqq") == [] and kb.context_for("zzz qqq") is None
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="`text`"):
        KnowledgeBase.from_jsonl(tmp_path / "bad.jsonl")


# --- commands ----------------------------------------------------------------------------------------


def test_guard_calibrate_and_bench_guard_commands(tmp_path, grounding_rows):
    from typer.testing import CliRunner

    from tunegate.cli import app

    data = tmp_path / "grounding.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in grounding_rows[:240]))
    config = tmp_path / "tunegate.yaml"
    config.write_text(f"var_dir: {tmp_path / 'var'}\nguardrails:\n  detectors: [grounding, uncertainty]\n")
    runner = CliRunner()
    result = runner.invoke(app, ["guard", "calibrate", "--data", str(data), "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["path"] == str(tmp_path / "var" / "guardrails" / "calibration.json")
    assert Calibration.load(summary["path"]).trained_on["rows"] == 240
    saved = Calibration.load(summary["path"])  # longer answers than these rows: the transfer's weights
    transfer = {f"grounding.{f}{u}" for f in ("excess_log", "number") for u in ("", "?unknown")}
    assert summary["length_range"] == saved.length_range and set(summary["transfer_weights"]) <= transfer

    out = tmp_path / "bench"
    args = ["bench", "guard", "--data", str(data), "--calibrate", str(data), "--config", str(config), "--json"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("n", "balanced_accuracy", "auroc", "f1", "p50_ms", "p95_ms", "p99_ms", "p50_ms_new_context"):
        assert key in report
    assert report["n"] == 240 and report["balanced_accuracy"] > 0.85
    # one run, two plans: every configured detector vs the weighted ones; no logprobs in the rows,
    # so uncertainty has no weight and the plan skips it, with the same risks and balanced accuracy
    everything, plan = report["runs"]["all"], report["runs"]["plan"]
    assert everything["detectors"] == ["grounding", "uncertainty"] and plan["detectors"] == ["grounding"]
    assert plan["skipped"] == ["uncertainty"] and report["plan"]["needs_logprobs"] is False
    assert report["risk_identical"] and plan["balanced_accuracy"] == everything["balanced_accuracy"]
    for run in (everything, plan):
        latency = run["latency"]
        assert set(latency) == {"all_checks", "repeated_context", "new_context"}
        assert latency["repeated_context"]["n"] + latency["new_context"]["n"] == 240
        assert {"p50_ms", "p95_ms"} <= set(latency["new_context"])
    assert report["detectors"]["uncertainty"] == {"known": 0.0, "auroc": None, "weighted": False}
    measured = report["measured_on"]
    assert measured["path"] == str(data) and measured["rows"] == 240 and len(measured["sha256"]) == 64
    assert measured["calibrated_on"] == str(data) and measured["measured_rows_in_calibration"] == 240
    stem = "guard_grounding_cal-grounding"
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.json", f"{stem}.png"]

    missing = runner.invoke(app, ["guard", "calibrate", "--data", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2


def test_bench_guard_measures_several_data_sets_with_hold_rate_spans_and_provenance(tmp_path, grounding_rows):
    from typer.testing import CliRunner

    from tunegate.cli import app

    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in grounding_rows[:120]))
    # the second carries gold spans: the whole answer where hallucinated, none where not
    marked = [{**r, "spans": [[0, len(r["answer"])]] if r["hallucinated"] else []} for r in grounding_rows[120:240]]
    second.write_text("".join(json.dumps(r) + "\n" for r in marked))
    config = tmp_path / "tunegate.yaml"
    config.write_text(f"var_dir: {tmp_path / 'var'}\nguardrails:\n  detectors: [grounding, uncertainty]\n")
    out = tmp_path / "bench"
    args = ["bench", "guard", "--data", str(first), "--data", str(second), "--calibrate", str(first)]
    result = CliRunner().invoke(app, [*args, "--config", str(config), "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report["datasets"]) == ["first", "second"]
    for name, rows in (("first", grounding_rows[:120]), ("second", marked)):
        one = report["datasets"][name]
        assert one["n"] == 120 and one["true_rate"] == round(sum(r["hallucinated"] for r in rows) / 120, 4)
        assert 0.0 <= one["hold_rate"] <= 1.0 and one["runs"]["plan"]["hold_rate"] == one["hold_rate"]
        assert one["provenance"]["detectors_trained_on"] == {"grounding": None, "uncertainty": None}
    assert report["datasets"]["first"]["provenance"]["measured_rows_in_calibration"] == 120
    assert report["datasets"]["second"]["provenance"]["measured_rows_in_calibration"] == 0
    assert report["datasets"]["first"]["span"] is None
    span = report["datasets"]["second"]["span"]
    assert span["rows"] == 120 and span["gold_chars"] == sum(len(r["answer"]) for r in marked if r["hallucinated"])
    assert 0.0 <= span["f1"] <= 1.0 and set(span["by_detector"]) == {"grounding", "uncertainty"}
    stem = "guard_first+second_cal-first"
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.json", f"{stem}.png"]


def test_bench_guard_learning_curve_never_fits_on_its_evaluation_split(tmp_path, grounding_rows):
    from bench.guard_learning import run, split_by_context

    rows = grounding_rows[:240]
    evaluation, pool = split_by_context(rows, 1 / 3, seed=0)
    assert sorted(evaluation + pool) == list(range(len(rows)))
    contexts = {i: rows[i].get("qid") or rows[i]["knowledge"] for i in range(len(rows))}
    assert not {contexts[i] for i in evaluation} & {contexts[i] for i in pool}  # whole contexts on one side
    data, dev = tmp_path / "route.jsonl", tmp_path / "cold.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dev.write_text("".join(json.dumps(r) + "\n" for r in grounding_rows[240:400]))
    settings = GuardrailSettings(detectors=["grounding"])
    result = run(data, dev, tmp_path / "out", settings=settings, sizes=(0, 20, 1000), draws=2)
    assert result["eval_rows"] == len(evaluation) and result["pool_rows"] == len(pool)
    assert result["reviewed_used"] == {"20": 20, "1000": len(pool)}  # capped at the pool, and says so
    refit = result["curve"]["refit"]
    assert list(refit) == ["0", "20", "1000"] and refit["20"]["draws"] == 2
    assert all(0.0 <= p["balanced_accuracy"] <= 1.0 and 0.0 <= p["hold_rate"] <= 1.0 for p in refit.values())
    assert result["curve"]["fine_tune"] == {"0": refit["0"]}  # no grounding model configured: nothing to tune
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["guard_learning.json", "guard_learning.png"]
