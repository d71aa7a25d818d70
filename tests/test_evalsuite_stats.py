"""evalsuite.stats: the gate's paired tests and the canary's rate and value comparisons, on small
hand-checked examples and their edge cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evalsuite.stats import (
    compare_means,
    compare_rates,
    mcnemar_exact,
    non_inferior,
    paired_bootstrap,
    required_pairs,
)


def test_mcnemar_counts_and_exact_p_by_hand():
    # b = 3 items only the candidate got right, c = 1 only the baseline; 2 agree (1 right, 1 wrong).
    candidate = [True, True, True, False, True, False]
    baseline = [False, False, False, True, True, False]
    result = mcnemar_exact(candidate, baseline)
    assert (result.n, result.candidate_only, result.baseline_only) == (6, 3, 1)
    assert result.candidate_accuracy == pytest.approx(4 / 6)
    assert result.baseline_accuracy == pytest.approx(2 / 6)
    assert result.difference == pytest.approx(2 / 6)
    # P(X >= 3 | X ~ Bin(4, 1/2)) = (4 + 1) / 16
    assert result.p_value == pytest.approx(5 / 16)
    assert result.method == "exact McNemar (one-sided)"


def test_mcnemar_is_one_sided_and_its_mirror_is_not_significant():
    better = [True] * 8 + [False] * 2
    worse = [False] * 8 + [True] * 2
    assert mcnemar_exact(better, worse).p_value == pytest.approx(56 / 1024)  # P(X >= 8 | Bin(10, 1/2))
    # The same items the other way round: the candidate is worse, nowhere near evidence it is better.
    assert mcnemar_exact(worse, better).p_value == pytest.approx(1 - 11 / 1024)  # P(X >= 2)


def test_mcnemar_all_agree_gives_p_one():
    same = [True, False, True, True]
    result = mcnemar_exact(same, same)
    assert (result.candidate_only, result.baseline_only, result.difference, result.p_value) == (0, 0, 0.0, 1.0)


def test_mcnemar_clearly_better_and_clearly_equal():
    # 40 items: candidate right on 35, baseline on 5 (the baseline's 5 are among the candidate's 35).
    candidate = [True] * 35 + [False] * 5
    baseline = [True] * 5 + [False] * 35
    assert mcnemar_exact(candidate, baseline).p_value < 0.001
    # Equal accuracy, 10 discordant items split 5 / 5.
    equal_candidate = [True] * 15 + [True] * 5 + [False] * 5 + [False] * 15
    equal_baseline = [True] * 15 + [False] * 5 + [True] * 5 + [False] * 15
    result = mcnemar_exact(equal_candidate, equal_baseline)
    assert result.difference == 0.0 and result.p_value > 0.3


def test_paired_inputs_are_checked():
    with pytest.raises(ValueError, match="candidate has 3, baseline has 2"):
        mcnemar_exact([True, False, True], [True, False])
    with pytest.raises(ValueError, match="at least one item"):
        mcnemar_exact([], [])
    with pytest.raises(ValueError, match="at least one item"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="candidate has 1, baseline has 0"):
        non_inferior([True], [], margin=0.05)


def test_paired_bootstrap_interval_contains_the_difference_and_is_reproducible():
    rng = np.random.default_rng(7)
    baseline = rng.random(200) < 0.6
    candidate = baseline.copy()
    flip = rng.choice(200, size=30, replace=False)
    candidate[flip[:22]] = True
    candidate[flip[22:]] = False
    interval = paired_bootstrap(candidate, baseline, n_resamples=1000, seed=3)
    assert interval.difference == pytest.approx(candidate.mean() - baseline.mean())
    assert interval.low <= interval.difference <= interval.high
    assert interval.high - interval.low < 0.2
    assert (interval.confidence, interval.n_resamples) == (0.95, 1000)
    assert paired_bootstrap(candidate, baseline, n_resamples=1000, seed=3) == interval
    wider = paired_bootstrap(candidate, baseline, n_resamples=1000, confidence=0.99, seed=3)
    assert wider.low <= interval.low and wider.high >= interval.high


def test_paired_bootstrap_all_agree_is_the_point():
    same = [True, False] * 10
    interval = paired_bootstrap(same, same)
    assert (interval.difference, interval.low, interval.high) == (0.0, 0.0, 0.0)


def test_non_inferiority_passes_for_identical_and_fails_for_a_clear_loss():
    baseline = [True] * 40 + [False] * 10
    identical = non_inferior(baseline, baseline, margin=0.02)
    assert identical.passed and identical.lower_bound == 0.0 and identical.difference == 0.0
    # The candidate loses 10 of the baseline's 40 right answers: difference -0.2, far past a 0.02 margin.
    candidate = [False] * 10 + [True] * 30 + [False] * 10
    lost = non_inferior(candidate, baseline, margin=0.02)
    assert lost.difference == pytest.approx(-0.2)
    assert lost.lower_bound < -0.02 and not lost.passed
    # The one-sided bound is the 5th percentile: above the two-sided 95% interval's low end.
    assert lost.lower_bound >= paired_bootstrap(candidate, baseline).low


def test_non_inferiority_validates_its_margin():
    with pytest.raises(ValueError, match="margin"):
        non_inferior([True], [True], margin=0.0)
    with pytest.raises(ValueError, match="confidence"):
        non_inferior([True], [True], margin=0.05, confidence=1.0)


def test_required_pairs_by_hand():
    # z_0.95 = 1.644854, z_0.8 = 0.841621:
    # (1.644854*sqrt(0.2) + 0.841621*sqrt(0.19))^2 / 0.01 = 121.54 -> 122
    assert required_pairs(0.05, 0.8, 0.1, 0.2) == 122
    # (1.644854*sqrt(0.35) + 0.841621*sqrt(0.26))^2 / 0.09 = 21.85 -> 22
    assert required_pairs(0.05, 0.8, 0.3, 0.35) == 22
    # psi below delta is raised to delta: (1.644854*sqrt(.2) + 0.841621*sqrt(.16))^2 / .04 = 28.74 -> 29
    assert required_pairs(0.05, 0.8, 0.2, 0.1) == required_pairs(0.05, 0.8, 0.2, 0.2) == 29


def test_required_pairs_shrinks_as_the_effect_grows():
    sizes = [required_pairs(0.05, 0.8, effect, 0.3) for effect in (0.02, 0.05, 0.1, 0.2, 0.3)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert required_pairs(0.01, 0.8, 0.1, 0.3) > required_pairs(0.05, 0.8, 0.1, 0.3)
    assert required_pairs(0.05, 0.9, 0.1, 0.3) > required_pairs(0.05, 0.8, 0.1, 0.3)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"power": 1.0}, "power"),
        ({"power": 0.0}, "power"),
        ({"min_effect": 0.0}, "min_effect"),
        ({"min_effect": 1.5}, "min_effect"),
        ({"discordance": -0.1}, "discordance"),
    ],
)
def test_required_pairs_names_the_bad_argument(kwargs, name):
    arguments = {"alpha": 0.05, "power": 0.8, "min_effect": 0.1, "discordance": 0.2} | kwargs
    with pytest.raises(ValueError, match=name):
        required_pairs(**arguments)


def test_compare_rates_one_sided_fisher():
    worse = compare_rates(30, 100, 10, 100)
    assert (worse.canary_rate, worse.active_rate) == (0.3, 0.1)
    assert worse.difference == pytest.approx(0.2)
    assert worse.p_value < 0.001
    # A canary that holds less is no alarm for a one-sided "higher" check.
    assert compare_rates(10, 100, 30, 100).p_value > 0.99
    assert compare_rates(10, 100, 10, 100).p_value > 0.5
    # By hand: table [[1, 0], [0, 1]], P(canary cell >= 1) under the hypergeometric = 1/2.
    assert compare_rates(1, 1, 0, 1).p_value == pytest.approx(0.5)


def test_compare_rates_empty_and_invalid():
    empty = compare_rates(0, 0, 3, 10)
    assert (empty.canary_rate, empty.active_rate, empty.difference, empty.p_value) == (None, 0.3, None, 1.0)
    assert compare_rates(0, 0, 0, 0).to_dict() == {
        "canary_rate": None,
        "active_rate": None,
        "difference": None,
        "p_value": 1.0,
    }
    with pytest.raises(ValueError, match="canary_count"):
        compare_rates(5, 4, 0, 10)
    with pytest.raises(ValueError, match="active_count"):
        compare_rates(1, 4, -1, 10)


def test_compare_means_detects_a_slower_canary():
    rng = np.random.default_rng(1)
    active = rng.lognormal(mean=0.0, sigma=0.5, size=200)
    canary = rng.lognormal(mean=0.5, sigma=0.5, size=200)
    slower = compare_means(canary, active)
    assert slower.p_value < 0.001
    assert slower.canary_mean == pytest.approx(float(np.mean(canary)))
    assert slower.active_p95 == pytest.approx(float(np.percentile(active, 95)))
    assert compare_means(active, canary).p_value > 0.99  # a faster canary is no alarm


def test_compare_means_small_by_hand_and_edges():
    # Every canary value above every active one: U = 9, exact one-sided p = 1 / C(6, 3) = 0.05.
    result = compare_means([4.0, 5.0, 6.0], [1.0, 2.0, 3.0])
    assert result.p_value == pytest.approx(0.05)
    assert (result.canary_mean, result.active_mean) == (5.0, 2.0)
    empty = compare_means([], [1.0, 2.0])
    assert (empty.canary_mean, empty.canary_p95, empty.p_value) == (None, None, 1.0)
    assert empty.active_mean == 1.5
    tied = compare_means([1.0] * 5, [1.0] * 5)
    assert math.isfinite(tied.p_value) and tied.p_value >= 0.5
    # A missing latency is dropped, not read as zero.
    assert compare_means([1.0, float("nan")], [1.0]).canary_mean == 1.0


def test_results_are_json_safe_and_rounded():
    result = mcnemar_exact([True, True, False], [False, True, True])
    data = result.to_dict()
    json.dumps(data, allow_nan=False)
    assert data["candidate_accuracy"] == round(2 / 3, 6)
    assert isinstance(data["candidate_only"], int)
    for value in (
        paired_bootstrap([True, False, True], [False, False, True], n_resamples=200).to_dict(),
        non_inferior([True, False, True], [False, False, True], margin=0.1).to_dict(),
        compare_rates(1, 3, 2, 7).to_dict(),
        compare_means([0.1, 0.2], [0.3]).to_dict(),
    ):
        json.dumps(value, allow_nan=False)
        assert all(v == round(v, 6) for v in value.values() if isinstance(v, float))
