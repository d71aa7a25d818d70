"""Benchmarks run (tiny shapes) and their data generators do what they say; no timing is asserted."""

from bench.training_claims import noisy_rows, trainable_fractions
from training.domain import Domain


def test_trainable_fraction_of_a_7b_lora_is_well_under_one_percent():
    fractions = trainable_fractions()
    assert fractions["trainable_params_7b_r16_qv"] == 32 * 2 * 16 * (4096 + 4096)
    assert 0 < fractions["trainable_fraction_7b_r16_qv"] < fractions["trainable_fraction_7b_r16_all_linear"] < 0.01


def test_noisy_set_is_large_duplicated_and_partly_wrong():
    domain = Domain()
    curated, noisy = domain.drift_rows(), noisy_rows(domain)
    assert len(noisy) == 5000 and len(curated) == len(domain.new_facts) * 4 + len(domain.old_facts)
    truth = {}
    for f in domain.facts:
        for q in f.train_questions:
            truth[q] = f.answer
    assert all(r["messages"][1]["content"] == truth[r["messages"][0]["content"]] for r in curated)
    questions = [r["messages"][0]["content"] for r in noisy]
    assert len(set(questions)) < 0.8 * len(questions)  # exact duplicates
    assert any(q not in truth for q in questions)  # near duplicates
    wrong = sum(
        1
        for r in noisy
        if r["messages"][0]["content"] in truth and r["messages"][1]["content"] != truth[r["messages"][0]["content"]]
    )
    assert wrong > 0.05 * len(noisy)
