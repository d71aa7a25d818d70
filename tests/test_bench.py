"""Benchmarks run (tiny shapes) and their data generators do what they say; no timing is asserted."""

import pytest

from bench import gpu_train
from bench.training_claims import noisy_rows, trainable_fractions
from training.domain import Domain


def test_gpu_train_runs_tiny_on_cpu_and_both_losses_agree():
    result = gpu_train.main(["--shape", "tiny", "--seq", "32", "--steps", "1", "--settings", "lora_b2_nockpt"])
    runs = result["runs"]["lora_b2_nockpt"]
    assert runs["baseline"]["tokens_per_s"] > 0 and runs["tunegate"]["tokens_per_s"] > 0
    # the chunked loss is the same loss: same weights, same data, same value
    assert runs["tunegate"]["loss"] == pytest.approx(runs["baseline"]["loss"], abs=1e-3)


def test_chunked_loss_equals_full_loss_and_gradient():
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 700, 16, requires_grad=True)  # crosses the 1024-token chunk boundary
    labels = torch.randint(0, 50, (2, 700))
    full = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    (g_full,) = torch.autograd.grad(full, hidden)
    chunked = gpu_train.chunked_lm_loss(hidden, head, labels)
    (g_chunked,) = torch.autograd.grad(chunked, hidden)
    assert torch.allclose(full, chunked, atol=1e-5) and torch.allclose(g_full, g_chunked, atol=1e-6)


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
