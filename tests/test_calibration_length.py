"""The calibration across answer lengths: a fit on short extractive answers must not hold every long one.

Real grounding results on a small made-up domain: the calibration is fitted on HaluEval-like rows (a
few words, copied from the context or invented) and then sees RAG-like answers of several sentences,
faithful ones in their own words and ones that add facts (`guardrails.calibration`, "Answers longer
than the fit rows").
"""

from __future__ import annotations

import json
import random

import pytest

from guardrails.calibration import LENGTH, TRANSFER_FEATURES, Calibration, CalibrationError, feature_vector
from guardrails.detectors.grounding import PARAPHRASE_ALLOWANCE, grounding
from guardrails.types import CheckInput

CONTEXT = (
    "Tariff T417 is offered in the Northvale region. Tariff T417 has a monthly standing charge of 12.40 EUR. "
    "Energy on tariff T417 costs 0.213 EUR/kWh. Tariff T417 has a minimum contract term of 12 months. "
    "Customers of tariff T417 can switch to paperless billing. The tariff was introduced by Brightwell Energy "
    "in 2019. Brightwell Energy is based in Harrowgate. Tariff T417 includes a smart meter at no extra cost."
)
QUESTION = "What does tariff T417 offer?"
SUPPORTED = ["Northvale region", "12.40 EUR", "0.213 EUR/kWh", "12 months", "Brightwell Energy", "2019",
             "Harrowgate", "paperless billing", "a smart meter", "Tariff T417"]  # fmt: skip
INVENTED = ["Kestrel Bay", "15.00 EUR", "0.5 EUR/kWh", "24 months", "Solaris Power", "2011", "Dunmore",
            "free solar panels", "a heat pump", "Tariff T999", "a loyalty bonus", "Quarry Hill"]  # fmt: skip
# In its own words: a few content words the context lacks ("households", "pay", "plan", ...), within
# the paraphrase allowance of one in five.
LONG_FAITHFUL = (
    "Tariff T417 is offered in the Northvale region, where households pay a monthly standing charge of "
    "12.40 EUR. Energy on this plan costs 0.213 EUR/kWh, and the minimum contract term is 12 months. "
    "Customers can also switch to paperless billing, and a smart meter comes at no extra cost. "
    "The tariff was introduced by Brightwell Energy, a supplier based in Harrowgate, in 2019."
)
LONG_INVENTED = (
    "Tariff T417 is offered in the Northvale region and along the coast of Kestrel Bay. It comes with free "
    "solar panels, a heat pump rental and a loyalty bonus for pensioners who stay longer than five years. "
    "Solaris Power took the tariff over in 2021 and guarantees a frozen price until 2030, with weekend "
    "electricity included. Brightwell Energy still handles complaints from its Dunmore call centre."
)


def _vector(answer: str) -> dict:
    return feature_vector([grounding(CheckInput(QUESTION, answer, CONTEXT))])


def _short_rows(n: int = 160, seed: int = 0):
    """HaluEval-like: a few words, copied from the context (supported) or invented (hallucinated)."""
    rng = random.Random(seed)
    vectors, labels = [], []
    for i in range(n):
        hallucinated = i % 2 == 0
        answer = rng.choice(INVENTED if hallucinated else SUPPORTED)
        if rng.random() < 0.3:  # sometimes wrapped in a short sentence the context also says
            answer = f"It is {answer}."
        vectors.append(_vector(answer))
        labels.append(hallucinated)
    return vectors, labels


@pytest.fixture(scope="module")
def fitted() -> Calibration:
    vectors, labels = _short_rows()
    return Calibration.fit(vectors, labels, source="short")


def test_grounding_allows_a_faithful_paraphrase_and_counts_what_goes_beyond():
    faithful = grounding(CheckInput(QUESTION, LONG_FAITHFUL, CONTEXT)).evidence
    invented = grounding(CheckInput(QUESTION, LONG_INVENTED, CONTEXT)).evidence
    assert 0 < faithful["unsupported_words"] <= PARAPHRASE_ALLOWANCE * faithful["words"]
    assert faithful["features"]["excess_log"] == 0.0  # its own words, within the allowance
    assert invented["unsupported_words"] > PARAPHRASE_ALLOWANCE * invented["words"]
    assert 0.0 < invented["features"]["excess_log"] < 1.0
    assert _vector(LONG_FAITHFUL)[LENGTH] == faithful["words"]  # the calibration sees the length


def test_grounding_list_markers_and_source_words_are_not_claims():
    answer = "Based on the given passages:\n1. Tariff T417 costs 12.40 EUR.\n2) Energy costs 0.213 EUR/kWh."
    evidence = grounding(CheckInput(QUESTION, answer, CONTEXT)).evidence
    assert evidence["numbers"] == 2 and evidence["unsupported_numbers"] == 0  # "1." and "2)" are the list
    assert evidence["unsupported_words"] == 0  # "based", "given", "passages" refer to the sources


def test_a_fit_on_short_answers_knows_their_length_and_fits_a_transfer(fitted):
    assert fitted.length_range is not None and fitted.length_range < _vector(LONG_FAITHFUL)[LENGTH]
    assert fitted.trained_on["length_range"] == fitted.length_range
    assert fitted.transfer is not None and set(fitted.transfer.features) <= set(TRANSFER_FEATURES)
    assert fitted.transfer.transfer is None and fitted.transfer.threshold == fitted.threshold
    assert fitted.weighs("grounding")


def test_long_answers_are_judged_by_the_transfer_not_flooded(fitted):
    faithful, invented = _vector(LONG_FAITHFUL), _vector(LONG_INVENTED)
    assert fitted.risk_of_vector(faithful) < fitted.threshold <= fitted.risk_of_vector(invented)
    assert fitted.risk_of_vector(faithful) == fitted.transfer.risk_of_vector(faithful)
    # The failure it fixes: the full regression, fitted where no faithful answer has a word the context
    # lacks, holds the faithful long answer too.
    full = Calibration.fit(*_short_rows(), source="short", transfer=False)
    assert full.transfer is None and full.length_range is None
    assert full.risk_of_vector(faithful) >= full.threshold
    # Short answers keep the full regression: the same risk with or without the transfer.
    short = _vector("12.40 EUR")
    assert fitted.risk_of_vector(short) == pytest.approx(full.risk_of_vector(short))
    assert fitted.risk_of_vector({k: v for k, v in faithful.items() if k != LENGTH}) == pytest.approx(
        full.risk_of_vector(faithful)
    )  # no length known: the full regression


def test_transfer_round_trips_and_old_files_still_load(fitted, tmp_path):
    path = fitted.save(tmp_path / "calibration.json")
    data = json.loads(path.read_text())
    assert data["transfer"]["features"] == fitted.transfer.features and data["transfer"]["transfer"] is None
    loaded = Calibration.load(path)
    assert loaded == fitted and isinstance(loaded.transfer, Calibration)
    long = _vector(LONG_INVENTED)
    assert loaded.risk_of_vector(long) == fitted.risk_of_vector(long)
    old = {k: v for k, v in data.items() if k not in ("length_range", "transfer")}  # written before either
    legacy = Calibration.from_dict(old)
    assert legacy.transfer is None and legacy.risk_of_vector(long) == pytest.approx(
        Calibration.fit(*_short_rows(), source="short", transfer=False).risk_of_vector(long)
    )


def test_no_length_or_no_transfer_feature_means_no_transfer():
    vectors, labels = _short_rows()
    no_length = [{k: v for k, v in vec.items() if k != LENGTH} for vec in vectors]
    assert Calibration.fit(no_length, labels).transfer is None
    other = [{"embedding": vec["grounding"], LENGTH: vec[LENGTH]} for vec in vectors]  # no grounding parts
    cal = Calibration.fit(other, labels)
    assert cal.transfer is None and cal.features == ["embedding"]  # the length is never a feature


def test_constant_transfer_features_mean_no_transfer_and_a_clear_error_alone():
    vectors, labels = _short_rows()
    flat = [{**vec, "grounding.excess_log": 0.0, "grounding.number": 0.0} for vec in vectors]
    assert Calibration.fit(flat, labels).transfer is None  # nothing to fit the transfer on: none
    with pytest.raises(CalibrationError, match="varies"):
        Calibration.fit([{"grounding": 0.5}] * 20, [True, False] * 10)


def test_bench_guard_allowance_reads_the_training_folders_only(tmp_path):
    from typer.testing import CliRunner

    from tunegate.cli import app

    rows = {
        "summedits": [(LONG_FAITHFUL, False), (LONG_INVENTED, True)],
        "rte": [("Tariff T417 costs 12.40 EUR.", False), ("Households in Northvale pay 12.40 EUR.", False)],
        "ragtruth-qa-dev": [("Dev rows are never read.", False)],  # a dev set: must not be counted
    }
    for folder, items in rows.items():
        (tmp_path / folder).mkdir()
        lines = [{"qid": f"{folder}-{i}", "knowledge": CONTEXT, "question": QUESTION, "answer": a, "hallucinated": h,
                  "source": folder} for i, (a, h) in enumerate(items)]  # fmt: skip
        (tmp_path / folder / f"{folder}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["bench", "guard-allowance", "--data-dir", str(tmp_path), "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["allowance"] == PARAPHRASE_ALLOWANCE and set(report["per_source"]) == {"summedits", "rte"}
    assert report["pooled"]["rows"] == 3 and report["per_source"]["summedits"]["hallucinated_median"] > 0.2
    assert sorted(p.name for p in out.iterdir()) == ["guard_allowance.json", "guard_allowance.png"]
    missing = CliRunner().invoke(app, ["bench", "guard-allowance", "--data-dir", str(tmp_path / "none")])
    assert missing.exit_code != 0 and "no training folders" in missing.output


def test_a_fit_on_answers_in_their_own_words_needs_no_transfer():
    vectors, labels = _short_rows()
    own_words = [
        {**vec, "grounding.excess_log": 0.1} if not y and i % 4 == 1 else vec
        for i, (vec, y) in enumerate(zip(vectors, labels, strict=True))
    ]  # a quarter of the faithful answers go beyond the paraphrase allowance: the fit has seen paraphrase
    cal = Calibration.fit(own_words, labels)
    assert cal.transfer is None and cal.length_range is None
    long = _vector(LONG_FAITHFUL)
    assert cal.risk_of_vector(long) == Calibration.fit(own_words, labels, transfer=False).risk_of_vector(long)
