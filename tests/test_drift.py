"""evalsuite.drift: numeric drift (KS / normed Wasserstein, PSI), flag-rate drift (Fisher), and the
domain classifier on text embeddings (a fake hashing embedder, and once the real MiniLM)."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from evalsuite.drift import embedding_drift, minilm_embedder, numeric_drift, population_stability_index, rate_drift


def hashing_embedder(texts: list[str]) -> np.ndarray:
    """Bag of words hashed into 64 dimensions (crc32: the same in every process), L2-normalised."""
    vectors = np.zeros((len(texts), 64))
    for row, text in enumerate(texts):
        for word in text.lower().split():
            vectors[row, zlib.crc32(word.encode()) % 64] += 1.0
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def sentences_from(vocabulary: list[str], count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocabulary, size=6)) for _ in range(count)]


BILLING = "tariff unit rate standing charge kwh meter bill invoice price peak offpeak".split()
NETWORK = "router password wifi reset modem signal cable firmware bandwidth port".split()


def test_numeric_drift_detects_a_shift_with_ks():
    rng = np.random.default_rng(0)
    result = numeric_drift(rng.normal(0, 1, 200), rng.normal(1, 1, 200))
    assert result.method == "ks" and result.drifted
    assert result.p_value < 1e-6 and result.statistic > 0.3
    assert result.psi > 0.25  # a one-sigma shift is a large PSI by any dashboard's rule
    assert (result.n_reference, result.n_current) == (200, 200)


def test_numeric_drift_ignores_a_non_shift():
    rng = np.random.default_rng(0)
    result = numeric_drift(rng.normal(0, 1, 200), rng.normal(0, 1, 200))
    assert result.method == "ks" and not result.drifted
    assert result.p_value > 0.05
    # PSI of two samples of one distribution is not 0: about (bins - 1) * (1/n + 1/m) = 0.09 here.
    assert result.psi < 0.25


def test_numeric_drift_uses_normed_wasserstein_for_large_windows():
    rng = np.random.default_rng(1)
    reference = rng.normal(10, 2, 2000)
    shifted = numeric_drift(reference, rng.normal(11, 2, 2000))
    assert shifted.method == "wasserstein normed" and shifted.p_value is None
    assert shifted.statistic == pytest.approx(0.5, abs=0.1)  # a shift of 1 over a std of 2
    assert shifted.drifted
    same = numeric_drift(reference, rng.normal(10, 2, 2000))
    assert same.method == "wasserstein normed" and not same.drifted and same.statistic < 0.1
    # Only one large window is enough to leave KS (which flags trivial differences at this size).
    assert numeric_drift(reference, rng.normal(10, 2, 300)).method == "wasserstein normed"


def test_psi_is_zero_for_identical_samples_and_grows_with_the_shift():
    rng = np.random.default_rng(2)
    sample = rng.normal(0, 1, 500)
    assert numeric_drift(sample, sample).psi == pytest.approx(0.0, abs=1e-12)
    small = population_stability_index(sample, sample + 0.2)
    large = population_stability_index(sample, sample + 1.0)
    assert 0 < small < large
    # Values past the reference's range land in the outer bins instead of vanishing.
    assert population_stability_index(sample, sample + 100.0) > 5


def test_numeric_drift_edge_cases():
    short = numeric_drift([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert short.method == "insufficient data" and not short.drifted
    assert (short.statistic, short.p_value, short.psi, short.n_reference) == (None, None, None, 4)
    # Missing values are dropped before counting.
    assert numeric_drift([1.0, float("nan")] * 5, [1.0] * 10).n_reference == 5
    # A constant reference (std 0) is guarded: no division by zero, and any move is drift.
    constant = numeric_drift([3.0] * 1500, [3.5] * 1500)
    assert constant.method == "wasserstein normed" and constant.drifted and np.isfinite(constant.statistic)
    assert not numeric_drift([3.0] * 1500, [3.0] * 1500).drifted


def test_rate_drift_detects_a_jump_in_the_flag_rate():
    rng = np.random.default_rng(3)
    reference = rng.random(200) < 0.05
    current = rng.random(200) < 0.40
    result = rate_drift(reference, current)
    assert result.method == "fisher exact on flag rate" and result.drifted
    assert result.p_value < 1e-6
    assert result.statistic == pytest.approx(current.mean() - reference.mean())
    assert result.psi is None


def test_rate_drift_is_two_sided_and_quiet_when_unchanged():
    high, low = [True] * 40 + [False] * 60, [True] * 5 + [False] * 95
    assert rate_drift(high, low).drifted  # a flag rate that collapses is drift too
    assert rate_drift(high, low).statistic == pytest.approx(-0.35)
    steady = rate_drift([True] * 10 + [False] * 90, [True] * 11 + [False] * 89)
    assert not steady.drifted and steady.p_value > 0.5
    assert rate_drift([True] * 3, [False] * 50).method == "insufficient data"


def test_embedding_drift_separates_different_vocabularies():
    reference = sentences_from(BILLING, 30, seed=0)
    current = sentences_from(NETWORK, 30, seed=1)
    result = embedding_drift(reference, current, hashing_embedder, top_k=4)
    assert result.method == "domain classifier" and result.drifted
    assert result.auroc > 0.9
    assert len(result.typical_drifted) == 4
    assert all(item["text"] in current for item in result.typical_drifted)
    scores = [item["score"] for item in result.typical_drifted]
    assert scores == sorted(scores, reverse=True)
    json.dumps(result.to_dict(), allow_nan=False)


def test_embedding_drift_does_not_separate_one_distribution():
    reference = sentences_from(BILLING, 40, seed=10)
    current = sentences_from(BILLING, 40, seed=11)
    result = embedding_drift(reference, current, hashing_embedder)
    assert result.method == "domain classifier"
    assert result.auroc < 0.75 and not result.drifted


def test_embedding_drift_deduplicates_typical_texts_and_handles_small_windows():
    reference = sentences_from(BILLING, 20, seed=4)
    current = ["router password reset"] * 10 + sentences_from(NETWORK, 10, seed=5)
    result = embedding_drift(reference, current, hashing_embedder, top_k=5)
    texts = [item["text"] for item in result.typical_drifted]
    assert len(texts) == len(set(texts)) == 5
    # Fewer than 2 * folds texts, or fewer than 2 in a window: no verdict.
    few = embedding_drift(["a b", "c d", "e f"], ["g h", "i j"], hashing_embedder)
    assert few.method == "insufficient data" and few.auroc is None and not few.drifted
    lonely = embedding_drift(reference, ["router reset"], hashing_embedder)
    assert lonely.method == "insufficient data" and not lonely.drifted
    # A small window shrinks the folds to fit instead of failing (3 current texts: 3 folds).
    assert embedding_drift(reference, current[-3:], hashing_embedder).auroc is not None


def test_embedding_drift_with_the_real_minilm():
    """The encoder the guardrails use: tariff questions against unrelated ones. Fails (never skips)
    when the model package is missing."""
    tariffs = [
        template.format(code=code)
        for code in ("T123", "T207", "T315", "T480", "T512")
        for template in (
            "What is the unit rate of tariff {code}?",
            "How much is the standing charge on tariff {code}?",
            "Does tariff {code} have a cheaper night rate?",
            "When does the price of tariff {code} change?",
        )
    ]
    unrelated = [
        "How do I reset my router password?",
        "What time does the swimming pool open on Sunday?",
        "Can you recommend a good book about the Roman empire?",
        "How long should I boil an egg for a soft yolk?",
        "Why is my laptop battery draining so quickly?",
        "What is the capital city of Australia?",
        "How do I change a flat tyre on a bicycle?",
        "Which plants grow well in a shady garden?",
        "How can I improve my sleep at night?",
        "What are the rules of chess castling?",
        "How do I export contacts from my phone?",
        "Where can I watch the football match tonight?",
        "How many legs does a spider have?",
        "What should I pack for a weekend hiking trip?",
        "How do I unblock a kitchen sink?",
        "Who painted the Mona Lisa?",
        "How do I train my puppy to sit?",
        "What is a good recipe for banana bread?",
        "How do I connect my printer to wifi?",
        "Why do cats purr?",
    ]
    result = embedding_drift(tariffs, unrelated, minilm_embedder())
    assert result.auroc > 0.9 and result.drifted
    assert all(item["text"] in unrelated for item in result.typical_drifted)


def test_minilm_embedder_caches_vectors_and_keeps_order():
    embed = minilm_embedder(cache_size=3)
    texts = ["What is the unit rate of tariff T123?", "How do I reset my router?", "Tariff T123: region?"]
    first = embed(texts)
    again = embed([texts[2], texts[0], texts[2]])  # from the cache, in the order asked
    assert np.allclose(again, first[[2, 0, 2]])
    more = embed(texts + ["One more question that evicts the oldest?"])  # more texts than the cache holds
    # Re-encoded in another batch, the int8 encoder's vector of the same text moves a little (padding and
    # dynamic quantisation depend on the batch: cosine 0.98 measured); the cache keeps one vector per text.
    assert more.shape == (4, 384) and (np.sum(more[:3] * first, axis=1) > 0.95).all()
    assert embed([]).shape == (0, 384)
