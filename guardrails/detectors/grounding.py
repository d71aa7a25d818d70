"""Lexical grounding: is every sentence of the answer supported, word by word, by the context?

Owns three checks per answer sentence against the context (and the question, which an answer may
restate): content words after normalisation and light stemming, named entities (capitalised spans and
letter-digit codes) and numbers with their units ("12.40 EUR" needs 12.4 EUR in the context, not
12.4 months). Pure function; imports `core.io`, `guardrails.cache`, `guardrails.text` and `guardrails.types`.

Score (a risk in [0, 1]): a noisy-OR of the evidence,
`1 - (1 - number) * (1 - entity) * (1 - lexical) * (1 - scatter)`, where `number` is the share of the
answer's numbers the context does not contain, `entity` the share of unsupported entities, `lexical`
the share of content words found neither in the context nor in the question, and `scatter` the share
of an answer sentence's supported words that its best-matching context sentence lacks (facts stitched
together from different sentences). No context: unknown. An answer with
nothing to check (e.g. "yes"): 0, with `"checked": 0` in the evidence. The calibrated risk
(`guardrails.calibration`) also sees the parts, as `grounding.<feature>`, and the counts of unsupported
words, numbers and entities (and of the worst sentence's words) on a log scale (`*_log`).

`excess_log` counts what does not depend on the answer's length: the unsupported words beyond
`PARAPHRASE_ALLOWANCE` of the answer's content words. A faithful answer written in its own words
leaves some of them unmatched ("steps", "include", "households"); an extractive one (HaluEval QA's)
none. The allowance, 0.2, is the median share a faithful answer leaves unmatched, measured on the
human-labelled faithful rows of the training folders (`tunegate bench guard-allowance`: 0.20 pooled
over the 2,125 faithful rows of the learned grounding model's training mix; per source from 0.0 to
0.71). The calibration scores answers longer than those it was fitted on by this feature and `number`
alone (`guardrails.calibration`, "Answers longer than the fit rows"). A list item's number ("2.") is
not a number the answer states.

What a passage offers as support is cached per SHA-256 of the passage (the cache holds no text),
for the `GROUNDING_CACHE_SIZE` most recently used passages (`guardrails.cache`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from core.io import sha256_text
from guardrails.cache import LRU
from guardrails.text import Number, content_words, entities, numbers, sentences, stem
from guardrails.types import CheckInput, DetectorResult, reads

NAME = "grounding"
#: Share of a faithful answer's content words the context does not contain (module docstring).
PARAPHRASE_ALLOWANCE = 0.2


@dataclass(frozen=True)
class _Support:
    """What a text offers as support: stems, numbers with their units, and the stems per sentence."""

    stems: frozenset[str]
    numbers: tuple[tuple[float, str], ...]
    sentence_stems: tuple[frozenset[str], ...]

    def has_number(self, n: Number) -> bool:
        # A number with a unit needs the same unit (or a bare number) in the support; a bare number
        # in the answer matches the value with any unit ("costs 12" is supported by "12 EUR").
        return any(abs(v - n.value) <= 1e-9 * max(1.0, abs(v)) and (not n.unit or not u or u == n.unit)
                   for v, u in self.numbers)  # fmt: skip


# A list item's number ("2. Preheat the oven"): the list's structure, not a number the answer states.
_LIST_MARKER_RE = re.compile(r"\s*\(?\d{1,3}[.):](?:\s|$)")

#: Passages whose support stays cached, least recently used out first.
GROUNDING_CACHE_SIZE = 2048
_SUPPORTS: LRU[str, _Support] = LRU(GROUNDING_CACHE_SIZE)  # sha256(passage) -> its support


def _support(text: str) -> _Support:
    """Cached per hash of the text: the same passage checked again costs nothing."""
    return _SUPPORTS.get_or_add(sha256_text(text), lambda: _support_of(text))


def _support_of(text: str) -> _Support:
    return _Support(
        frozenset(t.stem for t in content_words(text)),
        tuple((n.value, n.unit) for n in numbers(text)),
        tuple(frozenset(t.stem for t in content_words(text[a:b])) for a, b in sentences(text)),
    )


def _merge(spans: list[tuple[int, int]], text: str) -> list[tuple[int, int]]:
    """Sorted, overlapping or whitespace-adjacent spans joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + 1 and not text[out[-1][1] : a].strip(" -"):
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


@reads("question", "answer", "context")
def grounding(inp: CheckInput) -> DetectorResult:
    """Unsupported content words, entities and numbers of the answer, sentence by sentence."""
    if not inp.context or not inp.context.strip():
        return DetectorResult.unknown(NAME, "no context to ground the answer in")
    ctx = _support(inp.context)
    question = _support(inp.question or "")
    answer = inp.answer or ""

    scatter = 0.0
    n_words = unsup_ctx = unsup_both = n_nums = unsup_nums = n_ents = unsup_ents = 0
    spans: list[tuple[int, int]] = []
    per_sentence = []
    for s_start, s_end in sentences(answer):
        sent = answer[s_start:s_end]
        marker = _LIST_MARKER_RE.match(sent)
        nums = [n for n in numbers(sent) if not (marker and n.start < marker.end())]
        num_spans = [(n.start, n.end) for n in nums]
        words = [t for t in content_words(sent) if not any(a <= t.start < b for a, b in num_spans)]
        words = [t for t in words if not t.stem.replace(".", "").isdigit()]
        s_unsup = [t for t in words if t.stem not in ctx.stems]
        s_unsup_both = [t for t in s_unsup if t.stem not in question.stems]
        s_unsup_nums = [n for n in nums if not ctx.has_number(n) and not question.has_number(n)]
        ents = entities(sent)
        s_unsup_ents = []
        for text, a, b in ents:
            ent_stems = {t.stem for t in content_words(text)} or {stem(text)}
            if not ent_stems <= (ctx.stems | question.stems):
                s_unsup_ents.append((a, b))
        # Scatter: the supported words of one answer sentence should come from one context sentence;
        # words gathered from several ("X was founded in 1987" where 1987 is another thing's year)
        # are a recombination the context does not state.
        supported = {t.stem for t in words} & ctx.stems
        if supported and ctx.sentence_stems:
            best = max(len(supported & c) for c in ctx.sentence_stems) / len(supported)
            scatter = max(scatter, 1.0 - best)
        n_words += len(words)
        unsup_ctx += len(s_unsup)
        unsup_both += len(s_unsup_both)
        n_nums += len(nums)
        unsup_nums += len(s_unsup_nums)
        n_ents += len(ents)
        unsup_ents += len(s_unsup_ents)
        spans += [(s_start + t.start, s_start + t.end) for t in s_unsup_both]
        spans += [(s_start + n.start, s_start + n.end) for n in s_unsup_nums]
        spans += [(s_start + a, s_start + b) for a, b in s_unsup_ents]
        per_sentence.append(
            {
                "span": [s_start, s_end],
                "words": len(words),
                "unsupported_words": len(s_unsup_both),
                "unsupported_numbers": len(s_unsup_nums),
                "unsupported_entities": len(s_unsup_ents),
            }
        )

    lexical = unsup_both / n_words if n_words else 0.0
    number = unsup_nums / n_nums if n_nums else 0.0
    entity = unsup_ents / n_ents if n_ents else 0.0
    score = 1.0 - (1.0 - number) * (1.0 - entity) * (1.0 - lexical) * (1.0 - scatter)
    features = {
        "lexical": lexical,  # unsupported by context and question
        "lexical_context": unsup_ctx / n_words if n_words else 0.0,  # unsupported by the context alone
        "number": number,
        "entity": entity,
        "count": 1.0 - 0.5**unsup_ctx,  # how many unsupported words, saturating
        "scatter": scatter,  # share of a sentence's supported words missing from its best context sentence
        # Counts on a log scale that does not saturate at a few words: a long answer's shares stay small
        # where one sentence invents a fact (ragtruth-qa-dev, grouped 5-fold: BA 0.72 -> 0.77).
        "unsupported_log": _log_share(unsup_both, 64),
        "numbers_log": _log_share(unsup_nums, 16),
        "entities_log": _log_share(unsup_ents, 16),
        "worst_sentence_log": _log_share(max((x["unsupported_words"] for x in per_sentence), default=0), 16),
        "excess_log": _log_share(unsup_both - PARAPHRASE_ALLOWANCE * n_words, 64),  # beyond paraphrase
    }
    evidence = {
        "checked": n_words + n_nums,
        "words": n_words,
        "unsupported_words": unsup_both,
        "numbers": n_nums,
        "unsupported_numbers": unsup_nums,
        "entities": n_ents,
        "unsupported_entities": unsup_ents,
        "sentences": per_sentence,
        "features": features,
    }
    return DetectorResult(NAME, score, evidence, _merge(spans, answer))


def _log_share(count: float, cap: int) -> float:
    """log(1 + count) / log(1 + cap), at most 1: 0 for none (or fewer), 1 from `cap` on."""
    return min(1.0, math.log1p(max(0.0, count)) / math.log1p(cap))


grounding.clear_cache = lambda: _SUPPORTS.clear()  # type: ignore[attr-defined]  # forget cached passages (cold start)
