"""The embedded domain: deterministic, split into old and new, held-out phrasings kept apart."""

import re

import pytest

from training.domain import ATTRIBUTES, Domain, DomainConfig


def test_deterministic_for_a_config():
    assert Domain().content_hash() == Domain().content_hash()
    assert Domain().content_hash() != Domain(DomainConfig(seed=7)).content_hash()


def test_sizes_and_split():
    domain = Domain()
    assert len(domain.facts) == 80 * len(ATTRIBUTES)
    assert len(domain.old_facts) == 300 and len(domain.new_facts) == 100
    assert not set(domain.old_codes) & set(domain.new_codes)
    assert all(f.is_new == (f.code in domain.new_codes) for f in domain.facts)


def test_heldout_phrasings_are_never_training_phrasings():
    for fact in Domain().facts:
        assert len(fact.heldout_questions) == 2 and len(fact.train_questions) == 4
        assert not set(fact.heldout_questions) & set(fact.train_questions)
        assert all(fact.code in q for q in fact.heldout_questions + fact.train_questions)


def test_passages_state_the_answer():
    domain = Domain()
    for fact in domain.facts:
        assert fact.answer in fact.passage
        assert fact.passage in domain.knowledge_base[fact.code]


def test_qa_examples_are_chat_rows():
    domain = Domain()
    rows = domain.qa_examples(domain.new_facts)
    assert len(rows) == 400
    assert rows[0]["messages"][0]["role"] == "user" and rows[0]["messages"][1]["role"] == "assistant"


def test_grounding_set_is_labelled_and_plausible():
    domain = Domain()
    rows = domain.grounding_set
    right = [r for r in rows if not r.hallucinated]
    wrong = [r for r in rows if r.hallucinated]
    assert len(right) == len(domain.facts) and len(domain.facts) <= len(wrong) <= 2 * len(domain.facts)
    answers = {f.key: f.answer for f in domain.facts}
    for row in right:
        assert answers[row.key] in row.answer and answers[row.key] in row.knowledge
    for row in wrong:
        # a wrong answer names a value that the tariff's passage does not state for that attribute
        assert not re.search(rf"(?<![\w.]){re.escape(answers[row.key])}", row.answer)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_old_tariffs": 0}, "n_old_tariffs"),
        ({"heldout_per_fact": 6}, "heldout_per_fact"),
        ({"n_old_tariffs": 950}, "n_old_tariffs"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        DomainConfig(**kwargs)
