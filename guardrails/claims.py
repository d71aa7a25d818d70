"""Claims: an answer cut into the units a grounding check judges one by one.

Owns `claims(answer)`: sentences (`guardrails.text.sentences`), and within a sentence the clauses
that state separate facts: split at a semicolon, and at ", and", ", but", ", while", ", whereas",
", which" when both sides keep at least `MIN_CLAUSE_WORDS` words (a short list, "red, and blue",
stays one claim). Each claim is a `(start, end)` character span into the answer, stripped of
white space and of a list marker ("1.", "-", "*"), so the spans a detector reports are offsets into
the answer as the client got it. Pure functions of strings; imports `guardrails.text` and the
standard library only.

Bounded: the answer is scanned once by linear regexes, and at most `MAX_CLAIMS` claims are returned
(the rest of a longer answer becomes the last claim, so no character is left unchecked).
"""

from __future__ import annotations

import re

from guardrails.text import sentences

MIN_CLAUSE_WORDS = 4
MAX_CLAIMS = 64
# A clause boundary inside a sentence: "; " or ", <connective> " (linear: literal alternatives only).
_CLAUSE_RE = re.compile(r";\s+|,\s+(?=(?:and|but|while|whereas|which|although|though|so)\s)", re.IGNORECASE)
_MARKER_RE = re.compile(r"(?:[-*•]|\d{1,3}[.)])[ \t]+")
_BARE_MARKER_RE = re.compile(r"(?:[-*•]|\d{1,3}[.)])")  # a list number the sentence splitter cut off alone


def _words(text: str) -> int:
    return len(text.split())


def _strip(answer: str, start: int, end: int) -> tuple[int, int]:
    while start < end and answer[start].isspace():
        start += 1
    marker = _MARKER_RE.match(answer, start, end)
    if marker and marker.end() < end:
        start = marker.end()
    while end > start and answer[end - 1].isspace():
        end -= 1
    return start, end


def _clauses(answer: str, start: int, end: int) -> list[tuple[int, int]]:
    out, left = [], start
    for m in _CLAUSE_RE.finditer(answer, start, end):
        if _words(answer[left : m.start()]) >= MIN_CLAUSE_WORDS and _words(answer[m.end() : end]) >= MIN_CLAUSE_WORDS:
            out.append((left, m.start() + 1))  # the comma or semicolon stays with its clause
            left = m.end()
    out.append((left, end))
    return out


def claims(answer: str) -> list[tuple[int, int]]:
    """The claims of `answer` as `(start, end)` spans, in order, non-overlapping, none empty."""
    spans: list[tuple[int, int]] = []
    for s_start, s_end in sentences(answer):
        for a, b in _clauses(answer, s_start, s_end):
            a, b = _strip(answer, a, b)
            if a < b and not _BARE_MARKER_RE.fullmatch(answer, a, b):
                spans.append((a, b))
    if len(spans) > MAX_CLAIMS:
        spans = [*spans[: MAX_CLAIMS - 1], (spans[MAX_CLAIMS - 1][0], spans[-1][1])]
    return spans
