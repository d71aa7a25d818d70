"""Bounded work: PII masking is linear in its input (adversarial strings of 200 KB finish and mask
correctly), and every guardrail cache is keyed by a hash of its text and holds at most its bound.

No test asserts on wall-clock ratios (the machine is shared and loaded): each adversarial input runs
under a generous `signal.alarm` guard (before the fix some took hours) and must come out correct, and
the masker's Python work is counted deterministically (lines executed, by `sys.settrace`) at two sizes.
"""

from __future__ import annotations

import re
import signal
import sys
from contextlib import contextmanager

import pytest

from guardrails import pii
from guardrails.pii import scrub

SIZE = 200_000  # characters of adversarial input per case
GUARD_S = 10  # generous: the fixed masker needs well under a second for each case


class TookTooLong(Exception):
    pass


@contextmanager
def deadline(seconds: int = GUARD_S):
    """Raise `TookTooLong` in the block after `seconds` (SIGALRM also interrupts the regex engine)."""

    def expired(_signum, _frame):
        raise TookTooLong(f"did not finish within {seconds} s: not linear")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def repeat(unit: str, size: int = SIZE) -> str:
    return unit * (size // len(unit))


CARD_TAIL = ". Card 4111 1111 1111 1111 end."
IBAN_TAIL = " pay GB82 WEST 1234 5698 7654 32 now"
EMAIL_TAIL = " write to bob@example.com today"
PHONE_TAIL = " call +44 20 7946 0958 now"

# (name, adversarial filler of a given size, a real item appended, its kind): the filler holds no PII
# of that kind; before the fix the card cases took hours and the IBAN ones about 10 s per 200 KB.
ADVERSARIAL = [
    ("digits-with-hyphens", lambda n: repeat("1-", n), CARD_TAIL, "CARD"),
    ("digits-with-spaces", lambda n: repeat("1 ", n), CARD_TAIL, "CARD"),
    ("pairs-with-spaces", lambda n: repeat("12 ", n), CARD_TAIL, "CARD"),
    ("one-digit-run", lambda n: "1" * n, CARD_TAIL, "CARD"),
    ("ssn-shaped-chain", lambda n: repeat("123-45-", n), CARD_TAIL, "CARD"),
    ("long-digit-words", lambda n: repeat("0" + "1" * 30 + " ", n), CARD_TAIL, "CARD"),
    ("long-iban-words", lambda n: repeat("AB12" + "C" * 36 + " ", n), IBAN_TAIL, "IBAN"),
    ("long-iban-digit-words", lambda n: repeat("GB82" + "7" * 36 + " ", n), IBAN_TAIL, "IBAN"),
    ("email-domain-dots", lambda n: "a@" + repeat("a.", n), EMAIL_TAIL, "EMAIL"),
    ("email-local-dots", lambda n: repeat("a.", n) + "@", EMAIL_TAIL, "EMAIL"),
    ("email-at-chain", lambda n: repeat("a@", n), EMAIL_TAIL, "EMAIL"),
    ("email-mixed-domain", lambda n: "x@" + repeat("aa1.", n), EMAIL_TAIL, "EMAIL"),
    ("phone-plus-digits", lambda n: repeat("+" + "1" * 30 + " ", n), PHONE_TAIL, "PHONE"),
    ("phone-plus-groups", lambda n: repeat("+1 ", n), PHONE_TAIL, "PHONE"),
    ("phone-parenthesised", lambda n: repeat("(555) ", n), PHONE_TAIL, "PHONE"),
    ("phone-trunk-zero", lambda n: repeat("0" + "1" * 30 + " ", n), PHONE_TAIL, "PHONE"),
    ("nino-pairs", lambda n: repeat("AB 12 ", n), EMAIL_TAIL, "EMAIL"),
]
IDS = [a[0] for a in ADVERSARIAL]


@pytest.mark.parametrize(("name", "make", "tail", "kind"), ADVERSARIAL, ids=IDS)
def test_masking_200kb_of_adversarial_text_finishes_and_is_right(name, make, tail, kind):
    filler = make(SIZE)
    with deadline():
        masked, counts = scrub(filler + tail)
    assert counts[kind] >= 1 and f"[{kind}]" in masked[-60:], (name, dict(counts), masked[-80:])
    with deadline():
        alone, alone_counts = scrub(filler, kinds=[kind])
    assert alone_counts[kind] == 0 and alone == filler, name


def lines_run(text: str) -> int:
    """Python lines executed in `guardrails/pii.py` while masking `text`: a deterministic work count."""
    count = 0

    def local(_frame, event, _arg):
        nonlocal count
        count += event == "line"
        return local

    def enter(frame, _event, _arg):
        return local if frame.f_code.co_filename == pii.__file__ else None

    sys.settrace(enter)
    try:
        scrub(text)
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize(("name", "make", "tail", "kind"), ADVERSARIAL, ids=IDS)
def test_masking_work_grows_linearly_with_the_input(name, make, tail, kind):
    with deadline():
        small, large = lines_run(make(5_000) + tail), lines_run(make(20_000) + tail)
    # Four times the text: four times the Python work (the regex engine's share is under the alarm).
    assert large <= 4.5 * small + 200, (name, small, large)


def test_card_masking_keeps_its_meaning_on_long_spans():
    # From each group on, the most groups with 13-19 digits that pass Luhn form a card, as before the
    # windows were bounded (here two runs that mix the filler with the card happen to pass).
    span = " ".join(["12"] * 50) + " 4111 1111 1111 1111 " + " ".join(["7"] * 50)
    masked, counts = scrub(span, kinds=["CARD"])
    assert masked == " ".join(["12"] * 43) + " [CARD] [CARD] " + " ".join(["7"] * 48)
    assert counts == {"CARD": 2}
    assert scrub("order 12 4111-1111-1111-1111")[0] == "order 12 [CARD]"


# --- guardrail caches --------------------------------------------------------------------------------


def test_lru_keeps_the_most_recently_used_entries():
    from guardrails.cache import LRU

    cache = LRU(3)
    for key in "abc":
        cache.put(key, key.upper())
    assert cache.get("a") == "A"  # a is now the most recent: b goes first
    cache.put("d", "D")
    assert cache.keys() == ["c", "a", "d"] and len(cache) == 3
    assert cache.get_or_add("e", lambda: "E") == "E" and cache.get_or_add("e", lambda: "X") == "E"
    assert "c" not in cache.keys()
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="size"):
        LRU(0)


def test_grounding_cache_is_keyed_by_the_passage_hash_and_bounded():
    from core.io import sha256_text
    from guardrails.detectors import grounding as g
    from guardrails.types import CheckInput

    g.grounding.clear_cache()
    contexts = [f"Tariff T{i} costs {i}.50 EUR per month in Northvale." for i in range(g.GROUNDING_CACHE_SIZE + 50)]
    for i, context in enumerate(contexts):
        g.grounding(CheckInput(question="What does it cost?", answer=f"Tariff T{i} costs 3 EUR.", context=context))
    keys = g._SUPPORTS.keys()
    assert len(keys) <= g.GROUNDING_CACHE_SIZE
    assert all(re.fullmatch(r"[0-9a-f]{64}", k) for k in keys)  # hashes, never the passage
    assert sha256_text(contexts[-1]) in keys and sha256_text(contexts[0]) not in keys  # the oldest went first
    g.grounding.clear_cache()
    assert len(g._SUPPORTS) == 0


def test_stem_cache_holds_no_words_and_is_bounded():
    from guardrails import text

    text.clear_stem_cache()
    words = [f"zq{i}x{'ings' if i % 2 else 'ed'}" for i in range(text.STEM_CACHE_SIZE + 100)]
    stems = [text.stem(w) for w in words]
    assert len(text._STEMS) <= text.STEM_CACHE_SIZE
    held = [v for entry in text._STEMS.items() for part in entry for v in (part if isinstance(part, tuple) else [part])]
    assert not [v for v in held if isinstance(v, str) and len(v) > 1]  # a recipe (lengths, "y"), never the word
    assert stems[:2] == ["zq0x", "zq1xing"] and [text.stem(w) for w in words[:2]] == stems[:2]
    assert text.stem("Charges") == text.stem("charge") == text.stem("charged") == "charg"
    assert text.stem("Flies") == "fly" and text.stem("stopped") == "stop" and text.stem("Bob's") == "bob"
    text.clear_stem_cache()
