"""PII scrubbing: find personal data in text and replace it with typed placeholders (training data, traffic logs).

Owns the detectors for e-mail addresses, phone numbers, payment card numbers (Luhn-checked), US social
security numbers, UK National Insurance numbers and IBANs, and `scrub()`, which masks them and counts
what it masked. Pure functions of a string; imports nothing of ours (the standard library only).

Detection is deliberately conservative where a false positive would destroy useful data: a digit run
is a card only if it has 13-19 digits and passes the Luhn check, an IBAN only if its mod-97 check
passes, and a phone number only if it has a known shape (NANP `(555) 123-4567`, a national number
starting with 0, or an international `+` number). Bare local numbers such as `555-1234` are not
masked.

Masking runs in time linear in the text, whatever the text (200 KB of adversarial digits and
separators in well under a second; `tests/test_bounded.py`). Every repetition in a pattern is either
unambiguous (an iteration starts with a character the previous one cannot continue with) or bounded
(`{1,32}`), and the combinatorial parts are decided in Python: how an IBAN's words split into groups
(8 words at most), and which runs of digit groups are cards (at most 7 windows per group, each
Luhn-checked in O(1) from prefix sums).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import accumulate

EMAIL = "EMAIL"
PHONE = "PHONE"
CARD = "CARD"
SSN = "SSN"
UK_NINO = "UK_NINO"
IBAN = "IBAN"

#: Every kind `scrub()` knows, in the order the detectors run (the order matters: an IBAN contains
#: digit runs that could pass as a card, and an e-mail address can contain digits).
PII_KINDS: tuple[str, ...] = (EMAIL, IBAN, CARD, SSN, UK_NINO, PHONE)

_EMAIL_RE = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")

# Candidate IBAN: country code, check digits, then up to 8 words of capitals and digits (the first may
# be attached), ending at a word boundary. An IBAN's body is 3-8 groups of 1-4 characters; the groups
# are counted in Python (`_iban_end`), since `(?: ?[A-Z0-9]{1,4}){3,8}` tries every way to split a
# long word into groups before it fails (milliseconds per word: seconds for a page of them).
_IBAN_RE = re.compile(r"\b[A-Z]{2}\d{2} ?[A-Z0-9]{1,32}(?: [A-Z0-9]{1,32}){0,7}\b")
_IBAN_GROUPS = (3, 8)  # groups of 1-4 characters after the check digits

# A run of digits with single spaces or hyphens between groups; cards are searched inside it.
_DIGIT_SPAN_RE = re.compile(r"(?<![\d\w])\d+(?:[ -]\d+)*(?![\d\w])")
_DIGITS_RE = re.compile(r"\d+")
_CARD_DIGITS = (13, 19)

_SSN_RE = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")

# UK National Insurance number: two prefix letters (with the excluded letters and prefixes of the
# HMRC format), six digits, suffix A-D; spaces between pairs are allowed.
_NINO_RE = re.compile(r"\b(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")

_SEP = r"[ .-]?"
_PHONE_RE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])(?:"
    # NANP: optional +1, area code (parenthesised or not), 3 digits, separator, 4 digits.
    rf"(?:\+?1{_SEP})?(?:\(\d{{3}}\)|\d{{3}}){_SEP}\d{{3}}[ .-]\d{{4}}"
    # International: + country code and 2-5 more groups (an area code may be parenthesised).
    rf"|\+\d{{1,3}}(?:{_SEP}(?:\(\d{{1,4}}\)|\d{{1,5}})){{1,5}}"
    # National with trunk prefix 0, e.g. UK `020 7946 0958`, `07700 900123`.
    r"|\(?0\d{2,4}\)?[ -]?\d{3,4}[ -]?\d{3,4}"
    r")(?![\w])(?![ .-]\d)"
)


def luhn_ok(digits: str) -> bool:
    """True when the string of digits passes the Luhn (mod 10) check used by payment cards."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    """True when `candidate` (spaces allowed) is 15-34 characters and passes the ISO 13616 mod-97 check."""
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34 or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    numeric = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(numeric) % 97 == 1


def _iban_end(m: re.Match[str]) -> int | None:
    """Where the IBAN candidate starting at `m` ends: after the most words whose characters split into
    3-8 groups of 1-4 (as `(?: ?[A-Z0-9]{1,4}){3,8}\\b` would end), or None when none do."""
    lo, hi = _IBAN_GROUPS
    body = m.group(0)[4:]
    offset = m.start() + 4 + (1 if body.startswith(" ") else 0)
    end, groups, chars = None, 0, 0
    for word in body.lstrip(" ").split(" "):
        groups += -(-len(word) // 4)  # the fewest groups this word splits into
        chars += len(word)  # the most
        if groups > hi:
            break
        offset += len(word)
        if chars >= lo:
            end = offset
        offset += 1  # the space before the next word
    return end


def _mask_ibans(text: str, counts: Counter[str]) -> str:
    out: list[str] = []
    pos = 0
    m = _IBAN_RE.search(text)
    while m:
        end = _iban_end(m)
        if end is None:
            m = _IBAN_RE.search(text, m.start() + 1)
            continue
        # The candidate may swallow a following word in capitals ("... 32 THEN"); drop trailing groups
        # until the checksum passes.
        candidate = text[m.start() : end]
        groups = candidate.split(" ")
        while groups and not iban_ok(" ".join(groups)):
            groups.pop()
        out.append(text[pos : m.start()])
        if groups:
            counts[IBAN] += 1
            out.append("[IBAN]" + candidate[len(" ".join(groups)) :])
        else:
            out.append(candidate)
        pos = end
        m = _IBAN_RE.search(text, end)
    out.append(text[pos:])
    return "".join(out)


def _luhn_windows(digits: str) -> Callable[[int, int], bool]:
    """`ok(a, b)`: does `digits[a:b]` pass Luhn? O(1) per call after prefix sums over `digits`, of each
    digit's plain and doubled value by the parity of its position (a digit is doubled when its
    distance from the window's right end is odd)."""
    plain = [ord(ch) - 48 for ch in digits]
    doubled = [2 * d - 9 if 2 * d > 9 else 2 * d for d in plain]
    sums = []
    for values in (plain, doubled):
        for parity in (0, 1):
            kept = values[:]
            kept[1 - parity :: 2] = [0] * len(kept[1 - parity :: 2])
            sums.append(list(accumulate(kept, initial=0)))
    plain_at, doubled_at = sums[:2], sums[2:]

    def ok(a: int, b: int) -> bool:
        q = (b - 1) & 1  # positions with this parity are not doubled
        return (plain_at[q][b] - plain_at[q][a] + doubled_at[1 - q][b] - doubled_at[1 - q][a]) % 10 == 0

    return ok


def _mask_cards(text: str, counts: Counter[str]) -> str:
    lo, hi = _CARD_DIGITS

    def repl(m: re.Match[str]) -> str:
        span = m.group(0)
        # A card is any consecutive run of groups with 13-19 digits that passes Luhn (so "order 12
        # 4111 1111 1111 1111" masks only the card): from each group on, the most groups that do.
        groups = list(_DIGITS_RE.finditer(span))
        cum = list(accumulate((g.end() - g.start() for g in groups), initial=0))  # digits before group k
        if cum[-1] < lo:
            return span
        ok = _luhn_windows("".join(g.group(0) for g in groups))
        out: list[str] = []
        pos = 0
        i = 0
        while i < len(groups):
            # Window ends j (groups i..j-1) with 13-19 digits: at most 7 of them.
            first = bisect_left(cum, cum[i] + lo, i + 1)
            last = bisect_right(cum, cum[i] + hi, i + 1) - 1
            found = next((j for j in range(last, first - 1, -1) if ok(cum[i], cum[j])), None)
            if found is None:
                i += 1
                continue
            out.append(span[pos : groups[i].start()])
            out.append("[CARD]")
            counts[CARD] += 1
            pos = groups[found - 1].end()
            i = found
        out.append(span[pos:])
        return "".join(out)

    return _DIGIT_SPAN_RE.sub(repl, text)


def _mask_phones(text: str, counts: Counter[str]) -> str:
    def repl(m: re.Match[str]) -> str:
        n_digits = sum(ch.isdigit() for ch in m.group(0))
        if 8 <= n_digits <= 15:
            counts[PHONE] += 1
            return "[PHONE]"
        return m.group(0)

    return _PHONE_RE.sub(repl, text)


def _simple(kind: str, pattern: re.Pattern[str]) -> Callable[[str, Counter[str]], str]:
    def mask(text: str, counts: Counter[str]) -> str:
        new, n = pattern.subn(f"[{kind}]", text)
        counts[kind] += n
        return new

    return mask


_MASKERS: dict[str, Callable[[str, Counter[str]], str]] = {
    EMAIL: _simple(EMAIL, _EMAIL_RE),
    IBAN: _mask_ibans,
    CARD: _mask_cards,
    SSN: _simple(SSN, _SSN_RE),
    UK_NINO: _simple(UK_NINO, _NINO_RE),
    PHONE: _mask_phones,
}


def scrub(text: str, kinds: Iterable[str] = PII_KINDS) -> tuple[str, Counter[str]]:
    """Replace the PII in `text` with placeholders such as `[EMAIL]`; return the new text and counts per kind.

    `kinds` selects the detectors (a subset of `PII_KINDS`); they always run in `PII_KINDS` order.
    Only kinds that were found appear in the returned counter.
    """
    wanted = set(kinds)
    unknown = wanted - set(PII_KINDS)
    if unknown:
        raise ValueError(f"`kinds` has unknown PII kinds {sorted(unknown)}; choose from {list(PII_KINDS)}.")
    counts: Counter[str] = Counter()
    for kind in PII_KINDS:
        if kind in wanted:
            text = _MASKERS[kind](text, counts)
    return text, +counts
