"""The statistics behind the candidate gate and the canary's step checks.

Owns the paired comparison of two adapters on the same items (exact McNemar, a paired bootstrap
interval, a bootstrap non-inferiority check, and the number of items a gate needs: Connor 1987) and
the canary-versus-active comparisons of live traffic (rates by Fisher's exact test; risk and latency
by Mann-Whitney U). Pure functions over plain sequences: no database, no HTTP.

May import numpy and scipy (the standard library aside); none of tunegate's packages.

Every result is a dataclass whose `to_dict()` is JSON-safe (floats rounded to 6 places, NaN never
leaves this module).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

ROUND = 6


def json_safe(value):
    """Round floats (numpy's too) to 6 places; non-finite floats become None so `json.dumps` is strict-safe."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return round(float(value), ROUND) if math.isfinite(value) else None
    return value


class _ToDict:
    def to_dict(self) -> dict:
        return json_safe(asdict(self))


@dataclass(frozen=True)
class PairedTest(_ToDict):
    """Candidate and baseline graded on the same items."""

    n: int
    candidate_accuracy: float
    baseline_accuracy: float
    difference: float  # candidate - baseline
    candidate_only: int  # b: items only the candidate got right
    baseline_only: int  # c: items only the baseline got right
    p_value: float  # that the candidate is better (one-sided)
    method: str = "exact McNemar (one-sided)"


@dataclass(frozen=True)
class Interval(_ToDict):
    """A bootstrap confidence interval of the paired accuracy difference (candidate - baseline)."""

    difference: float
    low: float
    high: float
    confidence: float
    n_resamples: int


@dataclass(frozen=True)
class NonInferiority(_ToDict):
    """Is the candidate at worst `margin` below the baseline (one-sided lower bound > -margin)?"""

    difference: float
    lower_bound: float
    margin: float
    passed: bool


@dataclass(frozen=True)
class RateComparison(_ToDict):
    """A canary's rate (hold, error, override) against the active version's; p that the canary's is higher."""

    canary_rate: float | None
    active_rate: float | None
    difference: float | None  # canary - active
    p_value: float


@dataclass(frozen=True)
class MeanComparison(_ToDict):
    """A canary's values (risk, latency) against the active version's; p that the canary's are larger."""

    canary_mean: float | None
    active_mean: float | None
    canary_p95: float | None
    active_p95: float | None
    p_value: float


def _paired(candidate: Sequence[bool], baseline: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Both vectors as booleans, checked to grade the same (non-empty) list of items."""
    cand = np.asarray(candidate, dtype=bool).reshape(-1)
    base = np.asarray(baseline, dtype=bool).reshape(-1)
    if cand.size != base.size:
        raise ValueError(
            f"paired correctness needs one grade per item from both: candidate has {cand.size}, "
            f"baseline has {base.size}"
        )
    if cand.size == 0:
        # An empty gate set proves nothing either way; a caller must not read "p = 1" as a verdict.
        raise ValueError("paired correctness needs at least one item; both vectors are empty")
    return cand, base


def mcnemar_exact(candidate: Sequence[bool], baseline: Sequence[bool]) -> PairedTest:
    """One-sided exact McNemar test that the candidate is more often right than the baseline.

    Only the discordant items carry information: under the null each of the b + c is equally likely
    to favour either side, so b ~ Binomial(b + c, 1/2).
    """
    cand, base = _paired(candidate, baseline)
    b = int(np.sum(cand & ~base))
    c = int(np.sum(~cand & base))
    p_value = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue)
    cand_acc, base_acc = float(cand.mean()), float(base.mean())
    return PairedTest(
        n=int(cand.size),
        candidate_accuracy=cand_acc,
        baseline_accuracy=base_acc,
        difference=cand_acc - base_acc,
        candidate_only=b,
        baseline_only=c,
        p_value=p_value,
    )


def _bootstrap_interval(
    cand: np.ndarray, base: np.ndarray, *, n_resamples: int, confidence: float, seed: int, alternative: str
) -> tuple[float, float]:
    """Percentile bootstrap of mean(candidate) - mean(baseline), resampling item indices (pairs kept)."""
    difference = float(cand.mean() - base.mean())
    per_item = cand.astype(int) - base.astype(int)
    if np.all(per_item == per_item[0]):
        # Every item differs alike (all pairs agree, say): every resample gives the observed
        # difference, so the interval is that point; no need to let scipy resample a constant.
        return difference, difference
    result = stats.bootstrap(
        (cand.astype(float), base.astype(float)),
        lambda c, b, axis=-1: np.mean(c, axis=axis) - np.mean(b, axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        alternative=alternative,
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return float(low), float(high)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def paired_bootstrap(
    candidate: Sequence[bool],
    baseline: Sequence[bool],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Two-sided percentile bootstrap interval of the accuracy difference (candidate - baseline)."""
    cand, base = _paired(candidate, baseline)
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    low, high = _bootstrap_interval(
        cand, base, n_resamples=n_resamples, confidence=confidence, seed=seed, alternative="two-sided"
    )
    return Interval(
        difference=float(cand.mean() - base.mean()),
        low=low,
        high=high,
        confidence=confidence,
        n_resamples=n_resamples,
    )


def non_inferior(
    candidate: Sequence[bool],
    baseline: Sequence[bool],
    margin: float,
    confidence: float = 0.95,
    seed: int = 0,
    n_resamples: int = 2000,
) -> NonInferiority:
    """Passes when the one-sided lower confidence bound of the paired difference is above -margin.

    The bound is the bootstrap's (1 - confidence) percentile (the 5th for 0.95): a one-sided interval,
    because a gate only cares whether the candidate is worse, not whether it is much better.
    """
    cand, base = _paired(candidate, baseline)
    _check_confidence(confidence)
    if not 0.0 < margin < 1.0:
        raise ValueError(f"margin must be in (0, 1) (an accuracy difference), got {margin}")
    lower_bound, _ = _bootstrap_interval(
        cand, base, n_resamples=n_resamples, confidence=confidence, seed=seed, alternative="greater"
    )
    return NonInferiority(
        difference=float(cand.mean() - base.mean()),
        lower_bound=lower_bound,
        margin=margin,
        passed=bool(lower_bound > -margin),
    )


def required_pairs(alpha: float, power: float, min_effect: float, discordance: float) -> int:
    """Items a one-sided McNemar test needs to detect an accuracy difference `min_effect` (delta) with
    `power` at level `alpha`, when a share `discordance` (psi) of items disagree (Connor 1987):

        n = ceil((z_{1-alpha} sqrt(psi) + z_{power} sqrt(psi - delta^2))^2 / delta^2)

    psi is raised to delta when given smaller: the discordant share can never be below the difference
    it contains (delta = p_b - p_c <= p_b + p_c = psi).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    if not 0.0 < min_effect <= 1.0:
        raise ValueError(f"min_effect must be in (0, 1], got {min_effect}")
    if not 0.0 <= discordance <= 1.0:
        raise ValueError(f"discordance must be in [0, 1], got {discordance}")
    delta = float(min_effect)
    psi = max(float(discordance), delta)
    z_alpha = stats.norm.ppf(1.0 - alpha)
    z_power = stats.norm.ppf(power)
    n = (z_alpha * math.sqrt(psi) + z_power * math.sqrt(max(psi - delta**2, 0.0))) ** 2 / delta**2
    # Guard the float noise of an exact integer (e.g. 22.000000000004 must not become 23).
    return max(1, math.ceil(round(n, 9)))


def compare_rates(canary_count: int, canary_total: int, active_count: int, active_total: int) -> RateComparison:
    """One-sided Fisher exact test that the canary's rate is higher (worse) than the active version's."""
    for name, count, total in (("canary", canary_count, canary_total), ("active", active_count, active_total)):
        if total < 0 or not 0 <= count <= total:
            raise ValueError(f"{name}_count must be between 0 and {name}_total, got {count} of {total}")
    canary_rate = canary_count / canary_total if canary_total else None
    active_rate = active_count / active_total if active_total else None
    if canary_rate is None or active_rate is None:
        # No traffic on one side yet: nothing to test, and nothing to alarm about.
        return RateComparison(canary_rate=canary_rate, active_rate=active_rate, difference=None, p_value=1.0)
    table = [[canary_count, canary_total - canary_count], [active_count, active_total - active_count]]
    p_value = float(stats.fisher_exact(table, alternative="greater").pvalue)
    return RateComparison(
        canary_rate=canary_rate,
        active_rate=active_rate,
        difference=canary_rate - active_rate,
        p_value=p_value,
    )


def _finite(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    return array[np.isfinite(array)]  # a missing latency (None/NaN) is not a fast one


def compare_means(canary_values: Sequence[float], active_values: Sequence[float]) -> MeanComparison:
    """One-sided Mann-Whitney U that the canary's values (risk, latency) are larger than the active's.

    A rank test because latency is heavy-tailed: one slow request must not decide a step.
    Non-finite values are dropped; an empty side gives p = 1.0 and None for its statistics.
    """
    canary, active = _finite(canary_values), _finite(active_values)

    def mean(a: np.ndarray) -> float | None:
        return float(np.mean(a)) if a.size else None

    def p95(a: np.ndarray) -> float | None:
        return float(np.percentile(a, 95)) if a.size else None

    p_value = 1.0
    if canary.size and active.size:
        p_value = float(stats.mannwhitneyu(canary, active, alternative="greater").pvalue)
        if not math.isfinite(p_value):  # every value tied: no evidence the canary is larger
            p_value = 1.0
    return MeanComparison(
        canary_mean=mean(canary),
        active_mean=mean(active),
        canary_p95=p95(canary),
        active_p95=p95(active),
        p_value=p_value,
    )
