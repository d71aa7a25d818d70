"""Row builders shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import json

import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.db import Dataset, Example, Request
from core.io import sha256_text
from core.labels import REVIEWED_DATASET
from core.vocab import DatasetKind, ExampleSource


def add_reviewed(session: Session, question: str, answer: str, route: str = "support") -> None:
    """A held exchange of `route` and the reviewed example made of it, in the first `reviewed` dataset
    (created when there is none). tests/test_testsets.py has its own: the newest unfrozen dataset, a
    conversation history, the example returned."""
    dataset = session.scalar(sa.select(Dataset).where(Dataset.name == REVIEWED_DATASET))
    if dataset is None:
        dataset = Dataset(name=REVIEWED_DATASET, version=1, kind=DatasetKind.TRAIN)
        session.add(dataset)
        session.flush()
    conversation = [{"role": "user", "content": question}]
    request = Request(
        route=route, endpoint="/v1/chat/completions", prompt_text=question,
        request_json={"model": route, "messages": conversation}, answer_text=answer, decision="hold", risk=0.8,
    )  # fmt: skip
    session.add(request)
    session.flush()
    messages = [*conversation, {"role": "assistant", "content": answer}]
    session.add(Example(
        dataset_id=dataset.id, messages=messages, source=ExampleSource.REVIEW, source_request_id=request.id,
        content_hash=sha256_text(json.dumps(messages, sort_keys=True, ensure_ascii=False)),
    ))  # fmt: skip
    session.flush()


def question(i: int) -> str:
    """The `i`th distinct question of a route's test data."""
    return f"What is the unit rate of tariff T{i:04d}?"
