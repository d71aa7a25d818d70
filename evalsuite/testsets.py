"""Test sets that evolve: every reviewed answer of a route goes to exactly one of the frozen holdout,
the route's versioned test set, or the training labels, and never to two of them.

The review service stores each approved or corrected answer as an example of the dataset `reviewed`
(`core.labels.REVIEWED_DATASET`) with `split` unset. `assign_reviewed` splits the new ones, oldest first:

* the first `loop.holdout_size` go to `holdout:<route>` (one version), frozen once full: it never grows,
  so "no worse on the holdout" compares every version on the same items;
* after that, a share `loop.test_share` of them, chosen by a hash of the normalised question (the same
  question always lands on the same side, so a question asked twice cannot be in both), join the test
  set: each assignment that adds items is a new version `test:<route>` vN, whose items are those of
  v1..vN;
* the rest are training labels (`split = "train"`).

Reviewed items teach the test and training sides different phrasings of the same fact, which is what a
test of generalisation wants; near-duplicates of a test question are still removed from training data
by the curation's contamination rule (`contamination_texts` is its input), checked, not assumed.

Imports `core` only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.db import Dataset, Example, Request
from core.db.leases import advisory_lock
from core.io import last_user_text, normalise_answer, sha256_text
from core.labels import REVIEWED_DATASET
from core.loop_settings import LoopSettings
from core.vocab import DatasetKind

TRAIN_SPLIT = "train"


def dataset_name(kind: DatasetKind, route: str) -> str:
    """`test:support`, `holdout:support`."""
    return f"{kind.value}:{route}"


@dataclass(frozen=True)
class TestItem:
    example_id: int
    request_id: str | None
    prompt: list[dict]  # the conversation up to the gold answer
    answer: str  # the reviewed (gold) answer

    @property
    def question(self) -> str:
        return last_user_text(self.prompt)

    def to_row(self) -> dict:
        """The row `evalsuite.export.export_lm_eval` takes."""
        return {"id": str(self.example_id), "messages": self.prompt, "answer": self.answer}


@dataclass
class Assignment:
    route: str
    holdout: int = 0
    test: int = 0
    train: int = 0
    test_version: int | None = None
    holdout_frozen: bool = False
    example_ids: dict[str, list[int]] = field(default_factory=lambda: {"holdout": [], "test": [], "train": []})

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "example_ids"}


def _test_side(question: str, share: float) -> bool:
    digest = hashlib.sha256(normalise_answer(question).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def _versions(session: Session, kind: DatasetKind, route: str) -> list[Dataset]:
    name = dataset_name(kind, route)
    return list(session.scalars(sa.select(Dataset).where(Dataset.name == name).order_by(Dataset.version)))


def _reviewed_of_route(session: Session, route: str):
    return (
        sa.select(Example)
        .join(Dataset, Dataset.id == Example.dataset_id)
        .join(Request, Request.id == Example.source_request_id)
        .where(Dataset.name == REVIEWED_DATASET, Request.route == route)
    )


def _copy(example: Example, dataset: Dataset, split: str) -> Example:
    return Example(
        dataset_id=dataset.id,
        messages=example.messages,
        source=example.source,
        source_request_id=example.source_request_id,
        split=split,
        content_hash=example.content_hash,
    )


def assign_reviewed(session: Session, route: str, settings: LoopSettings) -> Assignment:
    """Split the route's reviewed examples that have no side yet (see the module docstring)."""
    result = Assignment(route)
    advisory_lock(session, f"tunegate.testsets:{route}")  # two workers never split the same examples
    pending = session.scalars(
        _reviewed_of_route(session, route).where(Example.split.is_(None)).order_by(Example.created_at, Example.id)
    ).all()
    holdout_versions = _versions(session, DatasetKind.HOLDOUT, route)
    holdout = holdout_versions[0] if holdout_versions else None
    test_versions = _versions(session, DatasetKind.TEST, route)
    new_test: Dataset | None = None
    for example in pending:
        if holdout is None or not holdout.frozen:
            if holdout is None:
                holdout = Dataset(name=dataset_name(DatasetKind.HOLDOUT, route), version=1, kind=DatasetKind.HOLDOUT)
                session.add(holdout)
                session.flush()
            session.add(_copy(example, holdout, DatasetKind.HOLDOUT.value))
            example.split = DatasetKind.HOLDOUT.value
            result.holdout += 1
            size = session.scalar(sa.select(sa.func.count()).where(Example.dataset_id == holdout.id)) or 0
            if size >= settings.holdout_size:
                session.flush()
                holdout.frozen = True
                holdout.content_hash = _content_hash([holdout])
        elif _test_side(last_user_text(example.messages[:-1]), settings.test_share):
            if new_test is None:
                number = test_versions[-1].version + 1 if test_versions else 1
                parent = test_versions[-1].id if test_versions else None
                new_test = Dataset(
                    name=dataset_name(DatasetKind.TEST, route),
                    version=number,
                    kind=DatasetKind.TEST,
                    parent_id=parent,
                    frozen=True,
                )
                session.add(new_test)
                session.flush()
            session.add(_copy(example, new_test, DatasetKind.TEST.value))
            example.split = DatasetKind.TEST.value
            result.test += 1
        else:
            example.split = TRAIN_SPLIT
            result.train += 1
        result.example_ids[example.split].append(example.id)
        session.flush()
    if new_test is not None:
        versions = [*test_versions, new_test]
        new_test.content_hash = _content_hash(versions)
        new_test.stats = {"items": _count(session, versions), "added": result.test}
        result.test_version = new_test.version
    result.holdout_frozen = bool(holdout and holdout.frozen)
    return result


def _count(session: Session, versions: list[Dataset]) -> int:
    ids = [v.id for v in versions]
    return session.scalar(sa.select(sa.func.count()).where(Example.dataset_id.in_(ids))) or 0


def _content_hash(versions: list[Dataset]) -> str:
    hashes = sorted(e.content_hash for v in versions for e in v.examples)
    return sha256_text(json.dumps(hashes))


def items(session: Session, route: str, kind: DatasetKind, version: int | None = None) -> list[TestItem]:
    """The route's holdout, or its test set at `version` (default: the newest), item by item."""
    versions = _versions(session, kind, route)
    if version is not None:
        versions = [v for v in versions if v.version <= version]
    ids = [v.id for v in versions]
    if not ids:
        return []
    rows = session.scalars(sa.select(Example).where(Example.dataset_id.in_(ids)).order_by(Example.id)).all()
    return [TestItem(e.id, e.source_request_id, list(e.messages[:-1]), e.messages[-1]["content"]) for e in rows]


def current_version(session: Session, route: str) -> int | None:
    versions = _versions(session, DatasetKind.TEST, route)
    return versions[-1].version if versions else None


def gold_answers(session: Session, route: str) -> dict[str, str]:
    """Normalised question -> gold answer for every test-set and holdout item of the route."""
    gold = {}
    for kind in (DatasetKind.HOLDOUT, DatasetKind.TEST):
        for item in items(session, route, kind):
            gold[normalise_answer(item.question)] = item.answer
    return gold


def contamination_texts(session: Session, route: str) -> list[str]:
    """Every question the route is evaluated on: what training data must not contain."""
    return [i.question for kind in (DatasetKind.HOLDOUT, DatasetKind.TEST) for i in items(session, route, kind)]


def training_labels(session: Session, route: str) -> list[dict]:
    """The route's reviewed examples on the training side, as chat rows (oldest first)."""
    rows = session.scalars(
        _reviewed_of_route(session, route).where(Example.split == TRAIN_SPLIT).order_by(Example.created_at, Example.id)
    ).all()
    return [{"messages": e.messages, "source_request_id": e.source_request_id} for e in rows]


def labels_since(session: Session, route: str, since) -> int:
    """Reviewed examples of the route on the training side stored after `since` (None: all of them):
    what a new training would learn that the last one did not."""
    query = _reviewed_of_route(session, route).where(Example.split == TRAIN_SPLIT).with_only_columns(sa.func.count())
    if since is not None:
        query = query.where(Example.created_at > since)
    return session.scalar(query) or 0
