"""Token-level uncertainty: how sure was the model of the tokens it sampled?

Owns the reading of vLLM's logprobs: the sampled tokens' logprobs (`token_logprobs`) and the top-k
alternatives per position (`top_logprobs`). Pure function; imports `guardrails.types` only.

Score: `1 - exp(mean logprob)`, one minus the geometric-mean probability of the answer's tokens.
Evidence features: `min_prob` (one minus the least likely token's probability), `low_share` (share of
tokens below probability 0.5) and `entropy` (mean entropy of the top-k distribution per position, the
mass outside the top k as one more outcome, divided by its maximum). With only `top_logprobs`, the
score is the entropy. No logprobs: unknown. Non-finite logprobs (NaN, None) are skipped; `-inf` is a
probability of 0.
"""

from __future__ import annotations

import math

from guardrails.types import CheckInput, DetectorResult, clip01, reads

NAME = "uncertainty"
_FLOOR = -50.0  # a logprob of -inf is "probability 0"; keep the mean finite


def _finite(values) -> list[float]:
    out = []
    for v in values or []:
        if v is None or isinstance(v, bool):
            continue
        v = float(v)
        if math.isnan(v):
            continue
        out.append(max(_FLOOR, min(0.0, v)))
    return out


def _entropy(top: dict[str, float]) -> float | None:
    """Normalised entropy of one position's top-k distribution (the remainder as one outcome)."""
    lps = _finite(list(top.values()))
    if not lps:
        return None
    probs = [math.exp(lp) for lp in lps]
    total = sum(probs)
    if total > 1.0:  # rounding in the server: renormalise
        probs = [p / total for p in probs]
        total = 1.0
    rest = 1.0 - total
    outcomes = probs + ([rest] if rest > 1e-9 else [])
    h = -sum(p * math.log(p) for p in outcomes if p > 0)
    h_max = math.log(len(probs) + 1)
    return h / h_max if h_max > 0 else 0.0


@reads("token_logprobs", "top_logprobs")
def uncertainty(inp: CheckInput) -> DetectorResult:
    """Risk from the answer's token probabilities (and the entropy of the alternatives)."""
    lps = _finite(inp.token_logprobs)
    entropies = [e for e in (_entropy(t) for t in (inp.top_logprobs or []) if isinstance(t, dict)) if e is not None]
    if not lps and not entropies:
        return DetectorResult.unknown(NAME, "no logprobs (ask vLLM for `logprobs`)")
    entropy = sum(entropies) / len(entropies) if entropies else None
    if not lps:
        return DetectorResult(NAME, clip01(entropy), {"tokens": 0, "features": {"entropy": entropy}})
    mean_lp = sum(lps) / len(lps)
    features = {
        "min_prob": clip01(1.0 - math.exp(min(lps))),
        "low_share": sum(1 for lp in lps if lp < math.log(0.5)) / len(lps),
        "entropy": entropy,
    }
    evidence = {
        "tokens": len(lps),
        "mean_logprob": round(mean_lp, 4),
        "min_logprob": round(min(lps), 4),
        "features": features,
    }
    return DetectorResult(NAME, clip01(1.0 - math.exp(mean_lp)), evidence)
