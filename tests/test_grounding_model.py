"""The learned grounding detector: claims, windows, training (on a tiny sample of the shared training
folders), the content-hashed cache, scoring with spans, the time budget, hostile text, and the guard
running without it until it is built."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import pytest

from core.settings import GuardrailSettings
from guardrails.claims import MAX_CLAIMS, claims
from guardrails.grounding_model import MAX_WINDOWS, Encoder, GroundingModel, Recipe, base_model_path, spans_of
from guardrails.grounding_training import DEV_FOLDERS, TRAINING_FOLDERS, train_detector, training_files, windows_of
from guardrails.types import CheckInput

# The shared data folder, as the product finds it: $TUNEGATE_DATA_DIR, else ../shared/data beside the checkout.
SHARED = Path(os.environ.get("TUNEGATE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
TINY = Recipe(max_length=128, answer_tokens=48, batch_size=4, rows_per_source={})


def test_claims_are_sentences_and_clauses_with_offsets():
    answer = "1. Paris is the capital of France, and it has about two million people. It rains; often in May."
    spans = claims(answer)
    texts = [answer[a:b] for a, b in spans]
    assert texts == [
        "Paris is the capital of France,",
        "and it has about two million people.",
        "It rains; often in May.",
    ]
    assert all(0 <= a < b <= len(answer) for a, b in spans)
    assert claims("Red, and blue.") == [(0, 14)]  # a short list stays one claim
    assert claims("   ") == []


def test_claims_are_bounded_and_cover_a_long_answer():
    answer = " ".join(f"Fact number {i} holds." for i in range(500))
    spans = claims(answer)
    assert len(spans) == MAX_CLAIMS and spans[-1][1] == len(answer)
    for hostile in (" " * 8000, "9" * 10_000, "a;" * 5000, ", and " * 3000):
        assert all(0 <= a < b <= len(hostile) for a, b in claims(hostile))


def test_spans_of_widens_to_words_and_merges():
    answer = "The fee is 12.40 EUR today."
    tokens = [(0, 3, 0.1), (4, 7, 0.2), (8, 10, 0.1), (11, 13, 0.9), (13, 16, 0.8), (17, 20, 0.7), (21, 26, 0.1)]
    assert spans_of(tokens, answer) == [(11, 20)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_path())


def test_windows_fit_and_labels_follow_spans(tokenizer):
    encoder = Encoder(tokenizer, TINY)
    context = " ".join(f"Sentence {i} says the tariff T{i} costs {i} euros." for i in range(200))
    answer = " ".join(f"The tariff T{i} costs {i + 1} euros." for i in range(40))
    bad = answer.index("T3 costs 4")
    windows = encoder.windows("what does it cost?", context, answer, [(bad, bad + 10)])
    assert 1 < len(windows) <= MAX_WINDOWS
    assert all(len(w.input_ids) <= TINY.max_length for w in windows)
    assert sum(sum(w.labels) for w in windows) >= 1
    covered = [o for w in windows for o in w.offsets]
    assert covered == sorted(covered)  # every answer token once, in order
    w = windows[0]
    assert w.input_ids[0] == tokenizer.cls_token_id and w.token_type_ids[w.answer_start] == 1
    # the context chosen for a window is the part that matches it: T0 is in the first window's context
    assert "t0" in tokenizer.decode(w.input_ids[1 : w.answer_start]).lower()


def _tiny_data(root: Path) -> Path:
    """Twelve rows of three training folders (one with spans) and a dev folder that must never be read."""
    rng = random.Random(0)
    for folder, name in (("summedits", "summedits.jsonl"), ("sick", "sick.jsonl"), ("rte", "rte.jsonl")):
        rows = [json.loads(line) for line in (SHARED / folder / name).read_text().splitlines()[:300]]
        (root / folder).mkdir(parents=True)
        (root / folder / name).write_text("\n".join(json.dumps(r) for r in rng.sample(rows, 12)) + "\n")
    (root / "ragtruth-qa-dev").mkdir()
    (root / "ragtruth-qa-dev" / "ragtruth_qa_dev.jsonl").write_text("not json: a dev set is never read\n")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not SHARED.is_dir():
        pytest.fail(f"the shared data folder {SHARED} is missing (CI has it; elsewhere set TUNEGATE_DATA_DIR)")
    data = _tiny_data(tmp_path_factory.mktemp("data"))
    models = tmp_path_factory.mktemp("models")
    steps = []
    result = train_detector(models, data, TINY, progress=lambda s, n, loss: steps.append((s, n)), threads=1)
    return data, models, result, steps


@pytest.mark.slow
def test_training_reads_only_training_folders_and_caches(trained):
    data, models, result, steps = trained
    assert not set(TRAINING_FOLDERS) & set(DEV_FOLDERS)
    assert all("ragtruth" not in str(p) for p in training_files(data))
    assert not result["reused"] and result["rows"] == 36 and steps[-1][0] == steps[-1][1] == result["steps"]
    assert (models / "grounding-current").resolve() == Path(result["path"]).resolve()
    again = train_detector(models, data, TINY)
    assert again["reused"] and again["path"] == result["path"]
    other = train_detector(models, data, Recipe(**{**TINY.__dict__, "seed": 1}), threads=1)
    assert other["path"] != result["path"]  # the recipe is part of the key
    assert (models / "grounding-current").resolve() == Path(other["path"]).resolve()
    assert not list(models.glob(".grounding-*"))  # no temporary folder left behind


@pytest.mark.slow
def test_detector_scores_claims_names_spans_and_keeps_its_budget(trained):
    from guardrails.detectors.grounding_model import GroundingModelDetector

    _, _, result, _ = trained
    model = GroundingModel(result["path"])
    detector = GroundingModelDetector(result["path"], budget_ms=None, model=model)
    context = "The Eiffel Tower is in Paris. It was finished in 1889 and is 330 metres tall."
    answer = "The Eiffel Tower is in Paris. It was finished in 1925, and it is made of glass."
    r = detector(CheckInput("Where is the Eiffel Tower?", answer, context))
    assert r.known and 0.0 <= r.score <= 1.0
    assert len(r.evidence["claims"]) == len(claims(answer))
    assert r.score == pytest.approx(max(p for _, _, p in r.evidence["claims"]), abs=1e-4)
    assert all(0 <= a < b <= len(answer) for a, b in r.unsupported_spans)
    assert set(r.evidence["features"]) == {"mean", "flagged"}
    assert not detector(CheckInput("q", answer, None)).known
    assert not detector(CheckInput("q", "  ", context)).known
    # A long answer needs several batches; a budget spent after the first makes the score unknown.
    long_answer = " ".join(f"Claim {i} is that the tower is {i} metres tall." for i in range(120))
    slow = GroundingModelDetector(result["path"], budget_ms=0.001, model=model)
    late = slow(CheckInput("q", long_answer, context))
    assert not late.known and "time budget" in late.evidence["reason"]
    # Hostile text is read in bounded windows and scored like any other.
    for hostile_context, hostile_answer in ((" " * 8000 + context, "9" * 10_000), (context * 400, " " * 8000 + "x")):
        out = detector(CheckInput("q", hostile_answer, hostile_context))
        assert out.score is None or 0.0 <= out.score <= 1.0


@pytest.mark.slow
def test_guard_runs_it_once_built_and_without_it_before(trained, tmp_path, caplog):
    from guardrails import registry
    from guardrails.guard import Guard

    _, _, result, _ = trained
    built = GuardrailSettings(detectors=["grounding", "grounding_model"], grounding_model_path=Path(result["path"]))
    guard = Guard(built)
    assert guard.active == ("grounding", "grounding_model")
    report = guard.check(CheckInput("q", "It was finished in 1925.", "It was finished in 1889."))
    assert report.results["grounding_model"].known
    missing = GuardrailSettings(detectors=["grounding", "grounding_model"], grounding_model_path=tmp_path / "none")
    registry._said.clear()
    with caplog.at_level(logging.WARNING, logger="guardrails.registry"):
        assert Guard(missing).active == ("grounding",)
        assert Guard(missing).active == ("grounding",)
    said = [r for r in caplog.records if "grounding_model" in r.getMessage()]
    assert len(said) == 1 and "train-detector" in said[0].getMessage()


def test_training_windows_label_rows_without_spans_at_answer_level(tokenizer):
    encoder = Encoder(tokenizer, TINY)
    rows = [
        {"knowledge": "A cat sat.", "question": "", "answer": "A dog sat.", "hallucinated": True},
        {"knowledge": "A cat sat.", "question": "", "answer": "A cat sat.", "hallucinated": False, "spans": []},
        {"knowledge": "A cat sat.", "question": "", "answer": "A cat ran.", "hallucinated": True, "spans": [[6, 9]]},
    ]
    (w1, y1), (w2, y2), (w3, y3) = windows_of(encoder, rows)
    assert (y1, w1.labels) == (1.0, None)
    assert y2 == 0.0 and not any(w2.labels)
    assert y3 == 1.0 and w3.labels == [0.0, 0.0, 1.0, 0.0]


@pytest.mark.slow
def test_bench_guard_says_what_the_detector_was_trained_on(trained, tmp_path):
    from bench.guard import run

    data, _, result, _ = trained
    dev = tmp_path / "ragtruth.jsonl"  # a few real dev rows with gold spans: never trained on
    rows = [
        json.loads(line) for line in (SHARED / "ragtruth-qa-dev" / "ragtruth_qa_dev.jsonl").read_text().splitlines()
    ]
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    seen = data / "summedits" / "summedits.jsonl"
    settings = GuardrailSettings(detectors=["grounding", "grounding_model"], grounding_model_path=Path(result["path"]))
    report = run([seen, dev], tmp_path / "out", settings=settings)
    trained_on = {n: r["provenance"]["detectors_trained_on"]["grounding_model"] for n, r in report["datasets"].items()}
    assert trained_on["summedits"]["measured_rows_in_training"] == 12  # measured on its own training rows: said
    assert trained_on["ragtruth"]["measured_rows_in_training"] == 0
    assert trained_on["ragtruth"]["rows"] == 36 and str(seen) in trained_on["ragtruth"]["trained_on"]
    assert report["datasets"]["ragtruth"]["span"]["rows"] == 16
    assert "grounding_model" in report["datasets"]["ragtruth"]["span"]["by_detector"]
