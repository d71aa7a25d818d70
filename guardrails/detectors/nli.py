"""NLI / hallucination classifier: does the context entail the answer, says a local model?

Owns loading a sequence-classification model from a local folder (`guardrails.nli_model_path`;
nothing is downloaded) and reading its labels. Imports `guardrails.types`, torch and transformers.

Labels are read from the model's `config.id2label`: with an entailment label (an NLI model such as
`entailment / neutral / contradiction`) the score is `1 - P(entailment)`; with a hallucination label
(`hallucinated`, `unsupported`, `contradiction`, `not_entailment`, ...) and no entailment label, the
score is the probability of that label. Premise: the context; hypothesis: the answer (optionally
prefixed by the question). No context: unknown.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from guardrails.types import CheckInput, DetectorResult, clip01, reads

NAME = "nli"
_NEGATIVE = ("not_entail", "not entail", "non_entail", "non-entail", "hallucinat", "contradict", "unsupported",
             "inconsistent", "unfaithful", "not_supported", "refute")  # fmt: skip
_POSITIVE = ("entail", "supported", "consistent", "faithful", "factual", "support")


def risk_labels(id2label: dict[int, str]) -> tuple[list[int], str]:
    """The label indices whose probability is the risk, and how they combine ("1-p" or "p")."""
    labels = {int(i): str(label).lower() for i, label in id2label.items()}
    negative = [i for i, lab in labels.items() if any(k in lab for k in _NEGATIVE)]
    positive = [i for i, lab in labels.items() if i not in negative and any(k in lab for k in _POSITIVE)]
    if positive:
        return positive, "1-p"
    if negative:
        return negative, "p"
    raise ValueError(
        f"cannot tell which of the labels {sorted(labels.values())} means entailed or hallucinated; set `id2label` "
        "in the model's config.json, e.g. {0: 'entailment', 1: 'neutral', 2: 'contradiction'}"
    )


@reads("question", "answer", "context")
class NLIDetector:
    """A local `AutoModelForSequenceClassification`: premise = context, hypothesis = answer."""

    name = NAME

    def __init__(self, model_path: str | Path, max_length: int = 512, with_question: bool = False) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(model_path)
        if not path.is_dir():
            raise ValueError(f"`guardrails.nli_model_path` {path} is not a folder; point it at a saved classifier")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        self.indices, self.mode = risk_labels(self.model.config.id2label)
        self.max_length = max_length
        self.with_question = with_question
        self._torch = torch
        self._lock = threading.Lock()

    def __call__(self, inp: CheckInput) -> DetectorResult:
        if not inp.context or not inp.context.strip():
            return DetectorResult.unknown(NAME, "no context to be the premise")
        hypothesis = f"{inp.question} {inp.answer}" if self.with_question else inp.answer
        torch = self._torch
        with self._lock, torch.inference_mode():
            batch = self.tokenizer(
                inp.context, hypothesis, return_tensors="pt", truncation="only_first", max_length=self.max_length
            )
            logits = self.model(**batch).logits.float()  # (1, labels)
            probs = torch.softmax(logits, dim=-1)[0]
        if not bool(torch.isfinite(probs).all()):
            return DetectorResult.unknown(NAME, "the classifier returned non-finite probabilities")
        p = float(probs[self.indices].sum())
        score = 1.0 - p if self.mode == "1-p" else p
        labels = self.model.config.id2label
        evidence = {"probabilities": {str(labels[i]): round(float(probs[i]), 4) for i in range(len(probs))}}
        return DetectorResult(NAME, clip01(score), evidence)
