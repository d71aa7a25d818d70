"""Retrieval for routes without client context: the best passages of a knowledge base for a question.

Owns reading a knowledge-base JSONL (one passage a line, in its `text` field; `passage` is accepted
too, as `tunegate domain export` writes it) and BM25 ranking over the same stemmed content words the
grounding detector checks (scikit-learn builds the term matrix). Imports `guardrails.text`, numpy,
scipy and scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.io import read_jsonl
from guardrails.text import content_words


def _terms(text: str) -> list[str]:
    return [t.stem for t in content_words(text)]


@dataclass(frozen=True)
class Passage:
    index: int
    text: str
    score: float


class KnowledgeBase:
    """BM25 (k1, b) over a list of passages."""

    def __init__(self, passages: list[str], k1: float = 1.5, b: float = 0.75) -> None:
        from sklearn.feature_extraction.text import CountVectorizer

        if not passages:
            raise ValueError("the knowledge base has no passages")
        self.passages = list(passages)
        self.k1, self.b = k1, b
        self.vectorizer = CountVectorizer(analyzer=_terms)
        tf = self.vectorizer.fit_transform(self.passages).tocsc().astype(np.float64)  # (passages, terms)
        n = tf.shape[0]
        df = np.diff(tf.indptr)  # passages per term
        self.idf = np.log1p((n - df + 0.5) / (df + 0.5))  # (terms,)
        lengths = np.asarray(tf.sum(axis=1)).ravel()
        norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1e-9))  # (passages,)
        # BM25 term weights, precomputed: tf * (k1 + 1) / (tf + norm) per stored entry.
        weights = tf.tocoo()
        data = weights.data * (k1 + 1) / (weights.data + norm[weights.row])
        from scipy.sparse import csc_matrix

        self.weights = csc_matrix((data, (weights.row, weights.col)), shape=tf.shape)

    @classmethod
    def from_jsonl(cls, path: str | Path, field: str = "text") -> KnowledgeBase:
        passages = []
        for lineno, row in read_jsonl(path):
            text = row.get(field, row.get("passage")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: no `{field}` string field (one passage a line, `text`)")
            passages.append(text)
        return cls(passages)

    def search(self, question: str, k: int = 3) -> list[Passage]:
        """The `k` best passages with a positive score, best first."""
        vocab = self.vectorizer.vocabulary_
        cols = sorted({vocab[t] for t in _terms(question) if t in vocab})
        if not cols:
            return []
        scores = np.asarray(self.weights[:, cols] @ self.idf[cols]).ravel()  # (passages,)
        top = np.argsort(-scores, kind="stable")[:k]
        return [Passage(int(i), self.passages[i], float(scores[i])) for i in top if scores[i] > 0]

    def context_for(self, question: str, k: int = 2) -> str | None:
        """The best passages joined into one context (None when nothing matches)."""
        hits = self.search(question, k)
        return "\n".join(p.text for p in hits) if hits else None
