"""Exact-answer accuracy of a served model on domain facts, asked through vLLM like live traffic.

Used by `tunegate bootstrap` (old/new fact accuracy of the base model) and by anything that
compares adapters on the embedded domain. Imports `core.vllm` and `training.domain`.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.io import normalise_answer as normalise
from core.vllm import chat_greedy
from training.domain import Fact


@dataclass
class FactEval:
    accuracy: float
    n: int
    wrong: list[dict]  # a few misses, for a person to read


def fact_accuracy(url: str, model: str, facts: list[Fact], heldout: bool = True) -> FactEval:
    """Share of questions (held-out phrasings by default) whose greedy answer is exactly the fact's."""
    asked = [(f, q) for f in facts for q in (f.heldout_questions if heldout else f.train_questions)]
    answers = chat_greedy(url, model, [[{"role": "user", "content": q}] for _, q in asked])
    hits, wrong = 0, []
    for (fact, question), answer in zip(asked, answers, strict=True):
        if normalise(answer) == normalise(fact.answer):
            hits += 1
        elif len(wrong) < 10:
            wrong.append({"question": question, "expected": fact.answer, "got": answer})
    return FactEval(hits / max(len(asked), 1), len(asked), wrong)
