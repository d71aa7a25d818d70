"""How curation filters and splits a dataset: `CurationConfig`, checked when it is built.

Every field carries its help text (`field(metadata={"help": ...})`), which the CLI shows; a bad
value is a `ValueError` that says what to set instead. Imports `guardrails.pii` (the PII kinds) and
`training.curation.readers` (the input formats).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from guardrails.pii import PII_KINDS
from training.curation.readers import FORMATS


@dataclass
class CurationConfig:
    """How `curate()` filters and splits a dataset."""

    max_tokens: int = field(
        default=2048,
        metadata={"help": "Longest example kept, in tokens of the rendered chat template (the base model context)."},
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of examples sent to `validation.jsonl`, in [0, 1)."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the split hash; the same seed and example always land in the same split."},
    )
    near_dup_threshold: float = field(
        default=0.8,
        metadata={"help": "Estimated Jaccard similarity of word shingles at or above which a row is a near-dup."},
    )
    near_dedup: bool = field(
        default=True,
        metadata={"help": "Remove near-duplicates with MinHash LSH (exact duplicates are always removed)."},
    )
    shingle_size: int = field(default=3, metadata={"help": "Words per shingle for near-duplicate detection."})
    num_perm: int = field(
        default=128, metadata={"help": "MinHash permutations; more is more accurate and slower (16-1024)."}
    )
    contamination_ngram: int = field(
        default=8,
        metadata={"help": "Words per n-gram of the contamination check (shorter test texts: their length)."},
    )
    contamination_overlap: float = field(
        default=0.0,
        metadata={
            "help": "Reject a user turn holding more than this share of a test text's n-grams "
            "(0: any shared n-gram) and all of its words that carry digits."
        },
    )
    scrub_pii: bool = field(default=True, metadata={"help": "Mask PII with typed placeholders such as `[EMAIL]`."})
    pii_kinds: tuple[str, ...] = field(
        default=PII_KINDS, metadata={"help": f"PII kinds to mask, a subset of {', '.join(PII_KINDS)}."}
    )
    input_format: str = field(
        default="auto",
        metadata={"help": "Input format: `auto` (detected per file), `chat`, `prompt_completion` or `alpaca`."},
    )
    max_samples_per_rule: int = field(default=5, metadata={"help": "Sample rejections kept per rule in the report."})

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(
                f"`max_tokens` must be a positive integer, got {self.max_tokens!r}; "
                "set it to the base model's context length, e.g. 2048."
            )
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"`validation_fraction` must be in [0, 1), got {self.validation_fraction!r}; "
                "use e.g. 0.1 for a 10% validation split or 0 for none."
            )
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise ValueError(
                f"`near_dup_threshold` must be in (0, 1], got {self.near_dup_threshold!r}; "
                "0.8 is a good default, or set `near_dedup=False` to turn near-duplicate removal off."
            )
        if not isinstance(self.shingle_size, int) or self.shingle_size < 1:
            raise ValueError(f"`shingle_size` must be an integer >= 1, got {self.shingle_size!r}; 3 is typical.")
        if not isinstance(self.num_perm, int) or not 16 <= self.num_perm <= 1024:
            raise ValueError(f"`num_perm` must be an integer in [16, 1024], got {self.num_perm!r}; 128 is typical.")
        if not isinstance(self.contamination_ngram, int) or self.contamination_ngram < 1:
            raise ValueError(
                f"`contamination_ngram` must be an integer >= 1, got {self.contamination_ngram!r}; "
                "8 words is the usual setting (13 is stricter about what counts as overlap)."
            )
        if not 0 <= self.contamination_overlap < 1:
            raise ValueError(
                f"`contamination_overlap` must be in [0, 1), got {self.contamination_overlap!r}; 0 (the "
                "default) rejects any shared n-gram, 0.5 more than half of a test text's n-grams."
            )
        self.pii_kinds = tuple(self.pii_kinds)
        unknown = sorted(set(self.pii_kinds) - set(PII_KINDS))
        if unknown:
            raise ValueError(f"`pii_kinds` got unknown kinds {unknown}; choose from {list(PII_KINDS)}.")
        if self.input_format not in ("auto", *FORMATS):
            raise ValueError(
                f"`input_format` must be one of {['auto', *FORMATS]}, got {self.input_format!r}; "
                "use `auto` to detect the format of each file."
            )
        if not isinstance(self.max_samples_per_rule, int) or self.max_samples_per_rule < 0:
            raise ValueError(f"`max_samples_per_rule` must be an integer >= 0, got {self.max_samples_per_rule!r}.")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pii_kinds"] = list(self.pii_kinds)
        return d
