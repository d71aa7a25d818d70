"""The curation rules: what gets a row rejected, and the keys that find duplicates and contamination.

Owns the rule names (`RULES`, in pipeline order), `Rejection` (a rejected row) and `Reject` (the
exception a check raises), `Example` (a row on its way through the pipeline), the role and length
checks, the chat-template check, PII scrubbing of an example (with `guardrails.pii`), exact and
MinHash near-duplicate detection, the entity-aware contamination check and the seeded split.
Imports `guardrails.pii`, `core.io` and datasketch; nothing else of ours.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from datasketch import MinHash, MinHashLSH

from core.io import sha256_text
from guardrails.pii import scrub

#: Rejection rules, in pipeline order.
RULES: tuple[str, ...] = (
    "json",
    "schema",
    "roles",
    "template",
    "length",
    "exact_duplicate",
    "near_duplicate",
    "contamination",
)
ROLES: tuple[str, ...] = ("system", "user", "assistant")
_WORD_RE = re.compile(r"\w+")


@dataclass(frozen=True)
class Rejection:
    """One rejected row: which rule, why, and where (input file and 1-based line)."""

    rule: str
    message: str
    source: str
    line: int

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "message": self.message, "source": self.source, "line": self.line}


class Reject(Exception):
    """Raised by a check: the row breaks `rule`; `at()` places it in a file."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message

    def at(self, source: str, line: int) -> Rejection:
        return Rejection(self.rule, self.message, source, line)


@dataclass
class Example:
    """A valid row: its chat `messages` and where it came from, plus what the steps learn about it."""

    messages: list[dict[str, str]]
    source: str
    line: int
    raw_user_turns: list[str] = field(default_factory=list)  # as written, before PII scrubbing
    pii: Counter[str] = field(default_factory=Counter)
    length: int = 0
    key: str = ""

    def __post_init__(self) -> None:
        self.raw_user_turns = self.user_turns()

    def user_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]


# --------------------------------------------------------------------------------------------------
# Validation, PII, template and length


def check_roles(messages: list[dict[str, str]]) -> None:
    """Known roles; after an optional system message, user and assistant turns alternate, ending with
    the assistant's."""
    for i, msg in enumerate(messages, start=1):
        if msg["role"] not in ROLES:
            raise Reject("roles", f"message {i} has role {msg['role'][:40]!r}; allowed roles are {', '.join(ROLES)}")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    offset = len(messages) - len(turns)
    if not turns:
        raise Reject("roles", "a system message alone is not an example; add a user and an assistant turn")
    for i, msg in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            raise Reject(
                "roles",
                f"message {i + 1 + offset} is `{msg['role']}` but `{want}` was expected: after an optional "
                "system message, turns must alternate user, assistant",
            )
    if turns[-1]["role"] != "assistant":
        raise Reject("roles", "the last message must be an `assistant` turn (the answer to learn)")


def scrub_example(ex: Example, kinds: Iterable[str]) -> None:
    """Mask the PII `kinds` in every turn of `ex` with typed placeholders, counting what was masked."""
    for m in ex.messages:
        m["content"], found = scrub(m["content"], kinds)
        ex.pii.update(found)


def check_tokenizer(tokenizer: Any) -> None:
    """A setup error unless `tokenizer` is None or a tokenizer with a chat template."""
    if tokenizer is None:
        return
    if not hasattr(tokenizer, "apply_chat_template"):
        raise TypeError(
            f"`tokenizer` must be a transformers tokenizer with `apply_chat_template`, got {type(tokenizer).__name__}."
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "`tokenizer` has no `chat_template`; set `tokenizer.chat_template` to the template the model is "
            "served with, or pass `tokenizer=None` to skip the template check."
        )


def token_length(messages: list[dict[str, str]], tokenizer: Any) -> int:
    """Apply the chat template (a `template` rejection when it fails) and return the length in tokens."""
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # a template can raise anything (jinja TemplateError, TypeError, ...)
        raise Reject("template", f"chat template failed: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(rendered, str):
        raise Reject("template", f"chat template returned {type(rendered).__name__}, not text")
    # The template already places any special tokens (BOS etc.), as TRL does when it tokenises.
    return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def word_length(messages: list[dict[str, str]]) -> int:
    """The length without a tokenizer: whitespace-separated words."""
    return sum(len(m["content"].split()) for m in messages)


def check_length(ex: Example, max_tokens: int, unit: str) -> None:
    if ex.length > max_tokens:
        raise Reject("length", f"{ex.length} {unit} is over `max_tokens` {max_tokens}")


# --------------------------------------------------------------------------------------------------
# Duplicates


def _norm_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def words(text: str) -> list[str]:
    """The words of `text`, NFKC-normalised and case-folded (punctuation dropped)."""
    return _WORD_RE.findall(unicodedata.normalize("NFKC", text).casefold())


def example_key(messages: list[dict[str, str]]) -> str:
    """Equal for examples that differ only in case and white space."""
    return sha256_text("\x1e".join(f"{m['role']}\x1f{_norm_text(m['content'])}" for m in messages))


class ExactDuplicates:
    """Rejects an example whose key was seen before (the first occurrence is kept); sets `ex.key`."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, int]] = {}

    def check(self, ex: Example) -> None:
        ex.key = example_key(ex.messages)
        first = self.seen.get(ex.key)
        if first is not None:
            raise Reject("exact_duplicate", f"duplicate of {first[0]} line {first[1]} (after normalising text)")
        self.seen[ex.key] = (ex.source, ex.line)


def _make_lsh(threshold: float, num_perm: int) -> tuple[MinHashLSH, float]:
    """An LSH index for `threshold`, or for the highest lower threshold datasketch accepts.

    datasketch needs at least two bands, which rules out thresholds near 1 for small `num_perm`
    (e.g. 0.99 at 128). A lower candidate threshold only finds more candidates; every candidate is
    verified against the real threshold, so the result is the same.
    """
    candidate = threshold
    while True:
        try:
            return MinHashLSH(threshold=candidate, num_perm=num_perm), candidate
        except ValueError:
            if candidate <= 0.5:
                raise
            candidate = round(max(0.5, candidate - 0.01), 2)


class NearDuplicates:
    """Rejects an example whose word shingles have an estimated Jaccard similarity of at least
    `threshold` with a kept one (MinHash LSH finds the candidates; each is verified)."""

    def __init__(self, threshold: float, num_perm: int, shingle_size: int) -> None:
        self.threshold, self.num_perm, self.shingle_size = threshold, num_perm, shingle_size
        self.lsh, lsh_threshold = _make_lsh(threshold, num_perm)
        self.kept: dict[str, tuple[MinHash, str, int]] = {}
        self.note = ""
        if lsh_threshold != threshold:
            self.note = f"LSH candidates at Jaccard {lsh_threshold:.2f}, verified at {threshold}"

    def minhash(self, messages: list[dict[str, str]]) -> MinHash:
        ws = [w for m in messages for w in words(m["content"])]
        k = self.shingle_size
        shingles = {" ".join(ws[i : i + k]) for i in range(max(1, len(ws) - k + 1))}
        mh = MinHash(num_perm=self.num_perm, seed=1)
        mh.update_batch([s.encode("utf-8") for s in sorted(shingles)])
        return mh

    def check(self, ex: Example) -> None:
        mh = self.minhash(ex.messages)
        for cand in sorted(self.lsh.query(mh)):
            other, src, line = self.kept[cand]
            sim = mh.jaccard(other)
            if sim >= self.threshold:
                raise Reject(
                    "near_duplicate",
                    f"near-duplicate of {src} line {line} (estimated Jaccard {sim:.2f} >= "
                    f"`near_dup_threshold` {self.threshold})",
                )
        name = str(len(self.kept))
        self.lsh.insert(name, mh)
        self.kept[name] = (mh, ex.source, ex.line)


# --------------------------------------------------------------------------------------------------
# Contamination and split


class Contamination:
    """N-gram index over eval test texts.

    A text is contaminated by a test text when it equals it (after normalising), or when it holds
    more than `overlap` of the test text's word n-grams (n = min(`n`, the test text's length); the
    default 0 means any shared n-gram) *and* every word of the test text that carries a digit (a
    code, an amount, a date). Why the second condition: in a templated domain, "What is the unit
    rate of tariff T417?" shares its template with the test question about tariff T896, and a
    question about another tariff is not the test question.
    """

    def __init__(self, test_texts: Iterable[str], n: int, overlap: float) -> None:
        self.n, self.overlap = n, overlap
        self.exact: dict[str, int] = {}
        self.grams_of: dict[int, set[tuple[str, ...]]] = {}
        self.anchors_of: dict[int, set[str]] = {}
        self.index: dict[tuple[str, ...], list[int]] = {}
        for idx, text in enumerate(test_texts):
            ws = words(str(text))
            if not ws:
                continue
            self.exact.setdefault(" ".join(ws), idx)
            k = min(n, len(ws))
            grams = {tuple(ws[i : i + k]) for i in range(len(ws) - k + 1)}
            self.grams_of[idx] = grams
            self.anchors_of[idx] = {w for w in ws if any(c.isdigit() for c in w)}
            for gram in grams:
                self.index.setdefault(gram, []).append(idx)
        self.sizes = sorted({len(g) for g in self.index})

    def __bool__(self) -> bool:
        return bool(self.exact)

    def find(self, text: str) -> str | None:
        """Why `text` is contaminated, or None."""
        ws = words(text)
        if not ws:
            return None
        hit = self.exact.get(" ".join(ws))
        if hit is not None:
            return f"equals test text {hit} (after normalising case and punctuation)"
        present = set(ws)
        shared: dict[int, list[tuple[str, ...]]] = {}
        for k in self.sizes:
            for gram in {tuple(ws[i : i + k]) for i in range(len(ws) - k + 1)}:
                for idx in self.index.get(gram, ()):
                    shared.setdefault(idx, []).append(gram)
        for idx, grams in sorted(shared.items()):
            if len(grams) / len(self.grams_of[idx]) > self.overlap and self.anchors_of[idx] <= present:
                shown = " ".join(min(grams))
                return f"shares the {len(grams[0])}-gram {shown[:120]!r} with test text {idx}"
        return None

    def check(self, ex: Example) -> None:
        """Rejects `ex` when a user turn, as written or after PII scrubbing, is contaminated."""
        for turn_no, (raw, clean) in enumerate(zip(ex.raw_user_turns, ex.user_turns(), strict=True), start=1):
            why = self.find(raw) or (self.find(clean) if clean != raw else None)
            if why:
                raise Reject("contamination", f"user turn {turn_no} {why}")


def split_of(key: str, seed: int, validation_fraction: float) -> str:
    """`train` or `validation`: a seeded hash of the example key, so an example keeps its split."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if u < validation_fraction else "train"
