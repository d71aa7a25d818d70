"""The embedded domain: a fictional utility's tariff codes, generated deterministically.

Northwind Energy sells tariffs named by codes (`T417`). Each tariff has five attributes
(region, standing charge, unit rate, late-payment fee, contract term); one attribute of one
tariff is one *fact*, with a knowledge-base passage and several question phrasings.
Tariffs are split into `old` ones, which the bootstrap base model is pre-trained on, and
`new` ones, introduced later: the drift event the loop must learn from reviewed traffic.
A labelled grounding set (question, passage, answer, hallucinated) feeds the guardrails.

Pure Python (the standard library and `core.io`): everything else in tunegate may import this.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from functools import cached_property

from core.io import sha256_text

REGIONS = [
    "Northvale", "Eastmoor", "Southbay", "Westridge", "Highcliff", "Lowfield", "Ashford", "Brightwater",
    "Cedarholm", "Dunmore", "Elmstead", "Foxhollow", "Glenrock", "Hartwell", "Ironbridge", "Kestrel Bay",
]  # fmt: skip
STANDING_CHARGES = [
    f"{v:.2f} EUR"
    for v in (6.5, 7.2, 8.4, 9.1, 9.9, 10.75, 11.3, 12.4, 13.05, 14.6, 15.2, 16.8, 17.35, 18.9, 19.45, 21.0)
]
UNIT_RATES = [
    f"0.{v} EUR/kWh" for v in (182, 191, 204, 213, 227, 231, 246, 252, 268, 274, 289, 295, 307, 318, 326, 341)
]
LATE_FEES = [f"{v:.2f} EUR" for v in (2.5, 3.0, 4.0, 4.5, 5.0, 6.0, 7.5, 8.0, 9.5, 10.0, 12.0, 15.0)]
CONTRACT_TERMS = [f"{m} months" for m in (3, 6, 9, 12, 18, 24, 36, 48)]


@dataclass(frozen=True)
class Attribute:
    """One kind of fact, with its value pool, its passage sentence and its question phrasings."""

    name: str
    values: tuple[str, ...]
    sentence: str  # how the knowledge base states it
    questions: tuple[str, ...]  # phrasings; `{code}` is the tariff code
    answer_sentence: str  # a full-sentence answer, for the grounding set


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        "region", tuple(REGIONS),
        "Tariff {code} is offered in the {value} region.",
        (
            "In which region is tariff {code} offered?",
            "Where is {code} available?",
            "Which region is {code} sold in?",
            "What region does tariff {code} cover?",
            "Tariff {code}: which region?",
            "Tell me the region of tariff {code}.",
        ),
        "Tariff {code} is offered in {value}.",
    ),
    Attribute(
        "standing_charge", tuple(STANDING_CHARGES),
        "Tariff {code} has a monthly standing charge of {value}.",
        (
            "What is the monthly standing charge for tariff {code}?",
            "How much is the standing charge on {code}?",
            "What standing charge does {code} have per month?",
            "Tariff {code}: monthly standing charge?",
            "Tell me the standing charge of tariff {code}.",
            "How much do customers on {code} pay each month before usage?",
        ),
        "The monthly standing charge for {code} is {value}.",
    ),
    Attribute(
        "unit_rate", tuple(UNIT_RATES),
        "Energy on tariff {code} costs {value}.",
        (
            "What is the unit rate of tariff {code}?",
            "How much does one kWh cost on {code}?",
            "What is the price per kWh for tariff {code}?",
            "Tariff {code}: unit rate?",
            "Tell me the energy price of {code}.",
            "How much is electricity per kWh under tariff {code}?",
        ),
        "The unit rate of {code} is {value}.",
    ),
    Attribute(
        "late_fee", tuple(LATE_FEES),
        "A late payment on tariff {code} incurs a fee of {value}.",
        (
            "What is the late-payment fee for tariff {code}?",
            "How much is charged for paying late on {code}?",
            "What fee applies to a late payment under {code}?",
            "Tariff {code}: late fee?",
            "Tell me the late payment fee of tariff {code}.",
            "If I pay my {code} bill late, what is the fee?",
        ),
        "The late-payment fee for {code} is {value}.",
    ),
    Attribute(
        "contract_term", tuple(CONTRACT_TERMS),
        "Tariff {code} has a minimum contract term of {value}.",
        (
            "What is the contract term of tariff {code}?",
            "How long is the minimum contract on {code}?",
            "For how long do I sign up with tariff {code}?",
            "Tariff {code}: contract length?",
            "Tell me the minimum term of {code}.",
            "How many months does a {code} contract last?",
        ),
        "The minimum contract term of {code} is {value}.",
    ),
)  # fmt: skip
ATTRIBUTE_BY_NAME = {a.name: a for a in ATTRIBUTES}
# One more phrasing per attribute that no training set, pre-training included, ever uses: the loop's
# measurement of whether an adapter learnt the fact or the sentence. Not part of `Fact`, so the domain's
# content hash (the base model's cache key) is unchanged.
UNSEEN_TEMPLATES = {
    "region": "Could you say which region tariff {code} belongs to?",
    "standing_charge": "Could you say what the monthly standing charge of tariff {code} is?",
    "unit_rate": "Could you say what a kWh costs on tariff {code}?",
    "late_fee": "Could you say what a late payment costs on tariff {code}?",
    "contract_term": "Could you say how long the contract of tariff {code} runs?",
}


@dataclass(frozen=True)
class Fact:
    """One attribute of one tariff, with the phrasings to train on and those held out."""

    code: str
    attribute: str
    answer: str
    passage: str
    train_questions: tuple[str, ...]
    heldout_questions: tuple[str, ...]
    is_new: bool

    @property
    def key(self) -> str:
        return f"{self.code}/{self.attribute}"

    @property
    def unseen_question(self) -> str:
        """The phrasing no training ever used (`UNSEEN_TEMPLATES`)."""
        return UNSEEN_TEMPLATES[self.attribute].format(code=self.code)

    def messages(self, question: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": question}, {"role": "assistant", "content": self.answer}]


@dataclass(frozen=True)
class GroundingExample:
    """A labelled guardrail example, in the row format of the HaluEval QA files."""

    knowledge: str
    question: str
    answer: str
    hallucinated: bool
    key: str


@dataclass(frozen=True)
class DomainConfig:
    """How big the generated domain is. Every field changes the content hash of the base model."""

    n_old_tariffs: int = field(default=60, metadata={"help": "Tariffs the base model is trained on."})
    n_new_tariffs: int = field(default=20, metadata={"help": "Tariffs that appear later (the drift)."})
    heldout_per_fact: int = field(default=2, metadata={"help": "Phrasings per fact kept for evaluation."})
    seed: int = field(default=1234, metadata={"help": "Seed of the generator."})

    def __post_init__(self) -> None:
        n_phrasings = min(len(a.questions) for a in ATTRIBUTES)
        if self.n_old_tariffs < 1 or self.n_new_tariffs < 0:
            raise ValueError("`n_old_tariffs` must be >= 1 and `n_new_tariffs` >= 0")
        if self.n_old_tariffs + self.n_new_tariffs > 900:
            raise ValueError("at most 900 tariffs fit the code space T100-T999; lower `n_old_tariffs`")
        if not 1 <= self.heldout_per_fact < n_phrasings:
            raise ValueError(f"`heldout_per_fact` must be between 1 and {n_phrasings - 1}")


class Domain:
    """The generated facts, passages, corpus and grounding set for one `DomainConfig`."""

    def __init__(self, config: DomainConfig | None = None) -> None:
        self.config = config or DomainConfig()
        rng = random.Random(self.config.seed)
        n = self.config.n_old_tariffs + self.config.n_new_tariffs
        codes = [f"T{c}" for c in rng.sample(range(100, 1000), n)]
        self.old_codes = codes[: self.config.n_old_tariffs]
        self.new_codes = codes[self.config.n_old_tariffs :]
        self.values: dict[str, dict[str, str]] = {
            code: {a.name: rng.choice(a.values) for a in ATTRIBUTES} for code in codes
        }
        self.facts: list[Fact] = []
        for code in codes:
            for attr in ATTRIBUTES:
                value = self.values[code][attr.name]
                phrasings = [q.format(code=code) for q in attr.questions]
                rng.shuffle(phrasings)
                k = self.config.heldout_per_fact
                self.facts.append(
                    Fact(
                        code=code,
                        attribute=attr.name,
                        answer=value,
                        passage=attr.sentence.format(code=code, value=value),
                        train_questions=tuple(phrasings[k:]),
                        heldout_questions=tuple(phrasings[:k]),
                        is_new=code in self.new_codes,
                    )
                )

    @property
    def codes(self) -> list[str]:
        return self.old_codes + self.new_codes

    @property
    def old_facts(self) -> list[Fact]:
        return [f for f in self.facts if not f.is_new]

    @property
    def new_facts(self) -> list[Fact]:
        return [f for f in self.facts if f.is_new]

    def tariff_passage(self, code: str) -> str:
        """The knowledge-base article of one tariff: all of its facts, in a fixed order."""
        return " ".join(f.passage for f in self.facts if f.code == code)

    @cached_property
    def knowledge_base(self) -> dict[str, str]:
        return {code: self.tariff_passage(code) for code in self.codes}

    def qa_examples(self, facts: list[Fact], heldout: bool = False) -> list[dict]:
        """Chat examples, one per phrasing: `{"messages": [...], "key": "T417/region"}`."""
        return [
            {"messages": f.messages(q), "key": f.key}
            for f in facts
            for q in (f.heldout_questions if heldout else f.train_questions)
        ]

    def drift_rows(self, replay: int | None = None, seed: int = 0) -> list[dict]:
        """The curated training set for the drift: every training phrasing of the new facts, plus one
        phrasing of each of `replay` old facts (default: all), so the adapter keeps what the base knew."""
        rng = random.Random(seed)
        new = [(f, q) for f in self.new_facts for q in f.train_questions]
        old = [(f, rng.choice(f.train_questions)) for f in self.old_facts]
        rows = [{"messages": f.messages(q)} for f, q in new + old[: len(old) if replay is None else replay]]
        rng.shuffle(rows)
        return rows

    @cached_property
    def grounding_set(self) -> list[GroundingExample]:
        """For every fact, its right answer and one or two plausible wrong ones (same value pool)."""
        rng = random.Random(self.config.seed + 1)
        rows: list[GroundingExample] = []
        for fact in self.facts:
            attr = ATTRIBUTE_BY_NAME[fact.attribute]
            question = rng.choice(fact.heldout_questions)
            knowledge = self.tariff_passage(fact.code)
            wrong = rng.sample([v for v in attr.values if v != fact.answer], rng.choice((1, 2)))
            for value, hallucinated in [(fact.answer, False), *((w, True) for w in wrong)]:
                sentence = rng.random() < 0.5
                answer = attr.answer_sentence.format(code=fact.code, value=value) if sentence else value
                rows.append(GroundingExample(knowledge, question, answer, hallucinated, fact.key))
        return rows

    def grounding_rows(self) -> list[dict]:
        return [asdict(r) for r in self.grounding_set]

    def content_hash(self) -> str:
        """A hash of everything generated: the base model's cache key depends on it."""
        return sha256_text(json.dumps([asdict(f) for f in self.facts], sort_keys=True))[:16]
