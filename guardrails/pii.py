"""PII scrubbing: find personal data in text and replace it with typed placeholders (training data, traffic logs).

Owns the detectors for e-mail addresses, phone numbers, payment card numbers (Luhn-checked), US social
security numbers, UK National Insurance numbers and IBANs, and `scrub()`, which masks them and counts
what it masked. Pure functions of a string; imports nothing of ours (the standard library only).

Detection is deliberately conservative where a false positive would destroy useful data: a digit run
is a card only if it has 13-19 digits and passes the Luhn check, an IBAN only if its mod-97 check
passes, and a phone number only if it has a known shape (NANP `(555) 123-4567`, a national number
starting with 0, or an international `+` number). Bare local numbers such as `555-1234` are not
masked.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable

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

# Candidate IBAN: country code, check digits, then 11-30 alphanumerics, optionally in groups of four.
_IBAN_RE = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4}){3,8}\b")

# A run of digits with single spaces or hyphens between groups; cards are searched inside it.
_DIGIT_SPAN_RE = re.compile(r"(?<![\d\w])\d+(?:[ -]\d+)*(?![\d\w])")

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


def _mask_ibans(text: str, counts: Counter[str]) -> str:
    def repl(m: re.Match[str]) -> str:
        # The pattern is greedy and may swallow a following word in capitals ("... 32 THEN"); drop
        # trailing groups until the checksum passes.
        groups = m.group(0).split(" ")
        while groups:
            candidate = " ".join(groups)
            if iban_ok(candidate):
                counts[IBAN] += 1
                return "[IBAN]" + m.group(0)[len(candidate) :]
            groups.pop()
        return m.group(0)

    return _IBAN_RE.sub(repl, text)


def _mask_cards(text: str, counts: Counter[str]) -> str:
    def repl(m: re.Match[str]) -> str:
        span = m.group(0)
        # Groups with their offsets in the span; a card is any consecutive run of groups with 13-19
        # digits that passes Luhn (so "order 12 4111 1111 1111 1111" masks only the card).
        groups = [(g.start(), g.end(), g.group(0)) for g in re.finditer(r"\d+", span)]
        out: list[str] = []
        pos = 0
        i = 0
        while i < len(groups):
            found = None
            for j in range(len(groups), i, -1):
                digits = "".join(g[2] for g in groups[i:j])
                if 13 <= len(digits) <= 19 and luhn_ok(digits):
                    found = j
                    break
            if found is None:
                i += 1
                continue
            start, end = groups[i][0], groups[found - 1][1]
            out.append(span[pos:start])
            out.append("[CARD]")
            counts[CARD] += 1
            pos = end
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
