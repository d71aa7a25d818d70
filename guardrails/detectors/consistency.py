"""Self-consistency: do other samples of the same request say the same thing as the answer?

Owns the agreement measure between the answer and extra samples: exact match after SQuAD-style
normalisation (lower case, punctuation and articles removed) and token F1. Pure function; imports
`guardrails.types` only.

Score: `1 - mean over samples of max(exact match, token F1)`; a model that knows the answer repeats it.
Fewer than 2 samples: unknown.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

from guardrails.types import CheckInput, DetectorResult, clip01, reads

NAME = "consistency"
MIN_SAMPLES = 2
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation + "’‘“”–—"})


def normalise_answer(text: str) -> str:
    text = unicodedata.normalize("NFKC", text or "").lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(a: str, b: str) -> float:
    ta, tb = normalise_answer(a).split(), normalise_answer(b).split()
    if not ta or not tb:
        return float(ta == tb)
    common = sum((Counter(ta) & Counter(tb)).values())
    if not common:
        return 0.0
    precision, recall = common / len(ta), common / len(tb)
    return 2 * precision * recall / (precision + recall)


@reads("answer", "samples")
def consistency(inp: CheckInput) -> DetectorResult:
    """Agreement of the answer with the extra samples."""
    samples = [s for s in inp.samples if isinstance(s, str)]
    if len(samples) < MIN_SAMPLES:
        return DetectorResult.unknown(
            NAME, f"{len(samples)} extra sample(s); needs {MIN_SAMPLES} (set `guardrails.consistency_samples`)"
        )
    answer = normalise_answer(inp.answer)
    exact = [float(normalise_answer(s) == answer) for s in samples]
    f1 = [token_f1(inp.answer, s) for s in samples]
    agreement = [max(e, f) for e, f in zip(exact, f1, strict=True)]
    evidence = {
        "samples": len(samples),
        "exact_match": sum(exact) / len(exact),
        "mean_f1": round(sum(f1) / len(f1), 4),
        "f1": [round(f, 4) for f in f1],
        "features": {"exact_mismatch": 1.0 - sum(exact) / len(exact)},
    }
    return DetectorResult(NAME, clip01(1.0 - sum(agreement) / len(agreement)), evidence)
