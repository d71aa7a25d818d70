"""Text normalisation shared by the detectors: sentences, content words, light stemming, entities, numbers.

Owns the tokenisation every lexical detector agrees on, so that "supported" means the same thing in
grounding, consistency and retrieval. Pure functions of strings; imports `guardrails.cache` and the
standard library only. `stem` caches how it stems a word (a recipe, keyed by the word's hash: no word
is kept), for at most `STEM_CACHE_SIZE` words.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass

from guardrails.cache import LRU

# A compact English stop-word list: function words, auxiliaries, question words and fillers. Words
# that carry meaning in an answer ("not", "no", "never", numbers) are deliberately absent. The last
# two lines: connectives, and the words by which an answer refers to its sources rather than the world
# ("based on the given passages, ...", "unable to answer from the information provided"): the words a
# faithful RAG answer most often adds to its context (ragtruth-qa-dev, a dev set).
STOPWORDS = frozenset(
    """
    a an the and or but if then else of to in on at by for with from into onto over under about as than
    so such that this these those there here it its it's is are was were be been being am do does did done
    have has had having i me my we our you your he him his she her they them their what which who whom whose
    when where why how also just only very too can could would should will shall may might must
    up down out off again further once all any both each few more most other some same own s t
    yes yeah no nope answer answers question according based known called named one
    therefore however additionally furthermore moreover thus hence overall
    passage passages given provided context mentioned stated unable information
    """.split()
)

_WORD_RE = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?")
# A number: optional sign, digits with thousands separators or a decimal part, an optional percent sign.
_NUMBER_RE = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?(?![\w])")
# A unit or currency right after a number ("12.40 EUR", "0.213 EUR/kWh", "12 months", "5 km").
_UNIT_AFTER_RE = re.compile(r"\s*([A-Za-z€$£%]{1,12}(?:/[A-Za-z]{1,6})?)")
_CURRENCY_BEFORE_RE = re.compile(r"([€$£])\s*$")
# Capitalised spans (Title Case words joined by short connectors) and codes mixing letters and digits.
_ENTITY_RE = re.compile(
    r"(?<![\w])(?:[A-Z][\w’'.-]*[A-Za-z0-9](?:\s+(?:of|the|de|la|von|van|and|du|del|da|&)?\s*[A-Z][\w’'.-]*[A-Za-z0-9])*)"
    r"|\b[A-Za-z]*\d+[A-Za-z]+\w*\b|\b[A-Za-z]+\d+\w*\b"
)
_SPLIT_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'“(])|\n+|(?<=[a-z0-9)\"”][.!?])(?=[A-Z])")

#: Units that name the same thing: the key is what the text says, the value what is compared.
_UNIT_ALIASES = {"€": "eur", "euro": "eur", "euros": "eur", "$": "usd", "dollars": "usd", "dollar": "usd",
                 "£": "gbp", "pounds": "gbp", "month": "months", "year": "years", "day": "days",
                 "week": "weeks", "hour": "hours", "minute": "minutes", "percent": "%", "per": ""}  # fmt: skip
_KNOWN_UNITS = frozenset(
    "eur usd gbp % months years days weeks hours minutes km kg m cm mm mi ft lb kwh mwh gw mw kw w v a mph kph "
    "million billion thousand trillion".split()
)


def normalise(text: str) -> str:
    """Lower case, accents removed, typographic quotes and dashes folded (offsets are not kept)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return text.replace("’", "'").replace("‘", "'").replace("–", "-").replace("—", "-").lower()


#: Words whose stemming `stem` remembers, least recently used out first (`guardrails.cache`).
STEM_CACHE_SIZE = 65_536
# hash(lower-cased word) -> (its length, how many of its characters the stem keeps, what it adds: "" or "y")
_STEMS: LRU[int, tuple[int, int, str]] = LRU(STEM_CACHE_SIZE)


def stem(word: str) -> str:
    """A light suffix stripper: plurals, possessives, -ing, -ed, -ly, -ies (enough to match "charges"
    with "charge" and "offered" with "offer"; never as aggressive as Porter)."""
    w = word.lower()
    key = hash(w)
    recipe = _STEMS.get(key)
    if recipe is None or recipe[0] != len(w):
        stemmed = _strip_suffixes(w)
        kept = len(os.path.commonprefix([w, stemmed]))
        recipe = (len(w), kept, stemmed[kept:])
        _STEMS.put(key, recipe)
    return w[: recipe[1]] + recipe[2]


def clear_stem_cache() -> None:
    """Forget every stemming recipe (a benchmark's cold start)."""
    _STEMS.clear()


def _strip_suffixes(w: str) -> str:
    if w.endswith(("'s", "’s")):
        w = w[:-2]
    if len(w) <= 3 or w.isdigit():
        return w
    for suffix, repl, min_len in (
        ("ies", "y", 5),
        ("ied", "y", 5),
        ("ing", "", 6),
        ("edly", "", 7),
        ("ed", "", 5),
        ("ly", "", 6),
        ("es", "", 5),
        ("s", "", 4),
    ):
        if w.endswith(suffix) and len(w) >= min_len and not w.endswith("ss"):
            w = w[: len(w) - len(suffix)] + repl
            break
    if len(w) > 4 and w[-1] == w[-2] and w[-1] not in "aeiouls":  # "stopped" -> "stopp" -> "stop"
        w = w[:-1]
    if len(w) > 4 and w.endswith("e"):  # "charge" and "charg(ed)" agree
        w = w[:-1]
    return w


@dataclass(frozen=True)
class Token:
    """A content word: its stem and where it is in the original text."""

    stem: str
    start: int
    end: int


def content_words(text: str) -> list[Token]:
    """Content words (stop words and bare punctuation dropped), stemmed, with character offsets.

    Offsets are into `text` itself: normalisation that changes lengths (accents) is applied per word.
    """
    out: list[Token] = []
    for m in re.finditer(r"[\w’']+", text):
        word = normalise(m.group())
        for sub in _WORD_RE.finditer(word):
            w = sub.group().rstrip("'")
            if w in STOPWORDS or (len(w) == 1 and not w.isdigit()):
                continue
            out.append(Token(stem(w), m.start(), m.end()))
    return out


def stems(text: str) -> set[str]:
    return {t.stem for t in content_words(text)}


def sentences(text: str) -> list[tuple[int, int]]:
    """Sentence spans `(start, end)` in `text`, stripped of surrounding white space."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SPLIT_RE.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a < b:
            out.append((a, b))
    return out


@dataclass(frozen=True)
class Number:
    """A number in text, its value, its unit (normalised, "" when none) and where it is."""

    value: float
    unit: str
    start: int
    end: int


def _unit(text: str, start: int, end: int) -> str:
    before = _CURRENCY_BEFORE_RE.search(text[max(0, start - 2) : start])
    if before:
        return _UNIT_ALIASES.get(before.group(1), before.group(1))
    m = _UNIT_AFTER_RE.match(text, end)
    if not m:
        return ""
    unit = normalise(m.group(1))
    unit = _UNIT_ALIASES.get(unit, unit)
    return unit if unit in _KNOWN_UNITS or "/" in unit else ""


def numbers(text: str) -> list[Number]:
    """Numbers with their units ("12.40 EUR" -> 12.4 eur; "1,200" -> 1200; "€5" -> 5 eur)."""
    out = []
    for m in _NUMBER_RE.finditer(text):
        raw = m.group().rstrip("%").replace(",", "")
        try:
            value = float(raw)
        except ValueError:
            continue
        unit = "%" if m.group().endswith("%") else _unit(text, m.start(), m.end())
        out.append(Number(value, unit, m.start(), m.end()))
    return out


def entities(text: str) -> list[tuple[str, int, int]]:
    """Named things: runs of capitalised words and letter-digit codes, with offsets. A capitalised
    stop word that only starts a sentence ("The", "In") is not an entity."""
    out = []
    for m in _ENTITY_RE.finditer(text):
        span, start = m.group(), m.start()
        words = span.split()
        while words and normalise(words[0]) in STOPWORDS:  # "The Simpsons" keeps "Simpsons"
            start += text[start:].index(words[0]) + len(words[0])
            while start < m.end() and text[start].isspace():
                start += 1
            words = words[1:]
        if not words:
            continue
        span = text[start : m.end()].rstrip(".'’-")
        if span and not span.isdigit() and normalise(span) not in _KNOWN_UNITS:
            out.append((span, start, start + len(span)))
    return out
