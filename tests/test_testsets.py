"""evalsuite.testsets on a migrated database (SQLite and PostgreSQL): the frozen holdout, the versioned
test set, the training side, and the curation's contamination rule against the test questions.

Data is built the way the product builds it: a `requests` row per exchange and, per decided review,
an example of the dataset `reviewed` whose messages are the conversation plus the reviewed answer.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.db import Dataset, Example, Request, session_scope, utcnow
from core.io import normalise_answer, read_jsonl, sha256_text, write_jsonl
from core.labels import REVIEWED_DATASET
from core.loop_settings import LoopSettings
from core.vocab import DatasetKind, ExampleSource
from evalsuite import testsets

from .helpers import question

ROUTE = "support"


def reviewed_dataset(session: Session) -> int:
    """The newest unfrozen `reviewed` dataset (as `gateway.review.outcomes._reviewed_dataset` keeps it)."""
    dataset = session.scalar(
        sa.select(Dataset).where(Dataset.name == REVIEWED_DATASET).order_by(Dataset.version.desc())
    )
    if dataset is None or dataset.frozen:
        dataset = Dataset(
            name=REVIEWED_DATASET, version=(dataset.version + 1 if dataset else 1), kind=DatasetKind.TRAIN
        )
        session.add(dataset)
        session.flush()
    return dataset.id


def add_reviewed(
    session: Session, question: str, answer: str, route: str = ROUTE, history: list[dict] | None = None
) -> Example:
    """One exchange of `route` and the reviewed example a decided review item makes of it."""
    conversation = [*(history or []), {"role": "user", "content": question}]
    request = Request(
        route=route,
        endpoint="/v1/chat/completions",
        prompt_text=question,
        request_json={"model": route, "messages": conversation},
        answer_text=answer,
        decision="hold",
        risk=0.7,
        status_code=200,
    )
    session.add(request)
    session.flush()
    messages = [*conversation, {"role": "assistant", "content": answer}]
    example = Example(
        dataset_id=reviewed_dataset(session),
        messages=messages,
        source=ExampleSource.REVIEW,
        source_request_id=request.id,
        content_hash=sha256_text(json.dumps(messages, sort_keys=True, ensure_ascii=False)),
    )
    session.add(example)
    session.flush()
    return example


def answer_of(i: int) -> str:
    return f"Tariff T{i:04d} costs {i % 97} cents per kWh."


def questions_on(side_test: bool, share: float, start: int, count: int) -> list[int]:
    """`count` question numbers from `start` on whose hash puts them on the test side (or not)."""
    found, i = [], start
    while len(found) < count:
        if testsets._test_side(question(i), share) == side_test:
            found.append(i)
        i += 1
    return found


def settings(holdout_size: int = 5, test_share: float = 0.25) -> LoopSettings:
    return LoopSettings(holdout_size=holdout_size, test_share=test_share)


def reviewed_splits(session: Session, route: str = ROUTE) -> dict[int, str | None]:
    rows = session.execute(
        sa.select(Example.id, Example.split)
        .join(Dataset, Dataset.id == Example.dataset_id)
        .join(Request, Request.id == Example.source_request_id)
        .where(Dataset.name == REVIEWED_DATASET, Request.route == route)
    ).all()
    return dict(rows)


def request_ids(items: list[testsets.TestItem]) -> set[str]:
    return {i.request_id for i in items}


def test_holdout_takes_the_first_items_then_freezes(db_sessions) -> None:
    cfg = settings(holdout_size=5)
    with session_scope(db_sessions) as s:
        first = [add_reviewed(s, question(i), answer_of(i)) for i in range(3)]
        a = testsets.assign_reviewed(s, ROUTE, cfg)
        assert (a.holdout, a.test, a.train, a.holdout_frozen) == (3, 0, 0, False)
        assert a.example_ids["holdout"] == [e.id for e in first]
    with session_scope(db_sessions) as s:
        more = [add_reviewed(s, question(i), answer_of(i)) for i in range(3, 10)]
        a = testsets.assign_reviewed(s, ROUTE, cfg)
        assert a.holdout == 2 and a.holdout_frozen
        assert a.example_ids["holdout"] == [more[0].id, more[1].id]  # oldest first
        assert a.test + a.train == 5
    with session_scope(db_sessions) as s:
        holdout = s.scalars(sa.select(Dataset).where(Dataset.name == f"holdout:{ROUTE}")).all()
        assert len(holdout) == 1 and holdout[0].frozen and holdout[0].kind == DatasetKind.HOLDOUT
        frozen_hash = holdout[0].content_hash
        assert frozen_hash
        items = testsets.items(s, ROUTE, DatasetKind.HOLDOUT)
        assert [i.question for i in items] == [question(i) for i in range(5)]
        assert [i.answer for i in items] == [answer_of(i) for i in range(5)]
    # More assignments never add to the holdout.
    for batch in range(2):
        with session_scope(db_sessions) as s:
            for i in range(100 + 10 * batch, 110 + 10 * batch):
                add_reviewed(s, question(i), answer_of(i))
            a = testsets.assign_reviewed(s, ROUTE, cfg)
            assert a.holdout == 0 and a.holdout_frozen and a.test + a.train == 10
    with session_scope(db_sessions) as s:
        holdout = s.scalar(sa.select(Dataset).where(Dataset.name == f"holdout:{ROUTE}"))
        assert holdout.content_hash == frozen_hash
        assert len(testsets.items(s, ROUTE, DatasetKind.HOLDOUT)) == 5


def test_test_share_and_sides_are_disjoint(db_sessions) -> None:
    cfg = settings(holdout_size=10, test_share=0.25)
    with session_scope(db_sessions) as s:
        for i in range(410):
            add_reviewed(s, question(i), answer_of(i))
        a = testsets.assign_reviewed(s, ROUTE, cfg)
    assert a.holdout == 10 and a.test + a.train == 400
    assert abs(a.test / 400 - 0.25) < 0.07, a.to_dict()
    with session_scope(db_sessions) as s:
        holdout = testsets.items(s, ROUTE, DatasetKind.HOLDOUT)
        test = testsets.items(s, ROUTE, DatasetKind.TEST)
        train = testsets.training_labels(s, ROUTE)
        ids = [request_ids(holdout), request_ids(test), {r["source_request_id"] for r in train}]
        assert [len(x) for x in ids] == [10, a.test, a.train]
        assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
        assert len(ids[0] | ids[1] | ids[2]) == 410
        # Every reviewed example got exactly one side, matching where its copy went.
        splits = reviewed_splits(s)
        assert set(splits.values()) == {"holdout", "test", "train"}
        assert sorted(a.example_ids["test"]) == sorted(k for k, v in splits.items() if v == "test")
        # The questions do not cross either: the test side is decided by the question's hash.
        test_q = {normalise_answer(i.question) for i in test}
        train_q = {normalise_answer(r["messages"][-2]["content"]) for r in train}
        assert not test_q & train_q
        assert all(testsets._test_side(i.question, 0.25) for i in test)


def test_the_same_question_always_lands_on_the_same_side(db_sessions) -> None:
    cfg = settings(holdout_size=2)
    on_test = questions_on(True, 0.25, 0, 3)
    on_train = questions_on(False, 0.25, 0, 3)
    with session_scope(db_sessions) as s:
        add_reviewed(s, "warm-up one", "a")
        add_reviewed(s, "warm-up two", "b")
        testsets.assign_reviewed(s, ROUTE, cfg)
    for round_ in range(2):  # the same questions asked again later, in other spellings
        with session_scope(db_sessions) as s:
            for i in on_test + on_train:
                text = question(i) if round_ == 0 else "  " + question(i).upper().replace(" ", "   ")
                add_reviewed(s, text, answer_of(i) if round_ == 0 else f"corrected {i}")
            a = testsets.assign_reviewed(s, ROUTE, cfg)
            assert (a.holdout, a.test, a.train) == (0, 3, 3)
    with session_scope(db_sessions) as s:
        test_q = [normalise_answer(i.question) for i in testsets.items(s, ROUTE, DatasetKind.TEST)]
        train_q = [normalise_answer(r["messages"][-2]["content"]) for r in testsets.training_labels(s, ROUTE)]
        assert sorted(test_q) == sorted(normalise_answer(question(i)) for i in on_test for _ in range(2))
        assert sorted(train_q) == sorted(normalise_answer(question(i)) for i in on_train for _ in range(2))


def test_each_run_that_adds_test_items_is_a_new_version(db_sessions) -> None:
    cfg = settings(holdout_size=2)
    on_test = questions_on(True, 0.25, 0, 9)
    on_train = questions_on(False, 0.25, 0, 6)
    with session_scope(db_sessions) as s:
        add_reviewed(s, "holdout one", "a")
        add_reviewed(s, "holdout two", "b")
        a = testsets.assign_reviewed(s, ROUTE, cfg)
        assert a.test_version is None and testsets.current_version(s, ROUTE) is None
        assert testsets.items(s, ROUTE, DatasetKind.TEST) == []
    batches = [(on_test[0:4], on_train[0:2]), (on_test[4:9], on_train[2:4]), ([], on_train[4:6])]
    seen: list[list[testsets.TestItem]] = []
    for n, (tests, trains) in enumerate(batches, start=1):
        with session_scope(db_sessions) as s:
            for i in tests + trains:
                add_reviewed(s, question(i), answer_of(i))
            a = testsets.assign_reviewed(s, ROUTE, cfg)
            assert (a.test, a.train) == (len(tests), len(trains))
            if tests:
                assert a.test_version == n and testsets.current_version(s, ROUTE) == n
                seen.append(testsets.items(s, ROUTE, DatasetKind.TEST))
            else:  # nothing added: no new version
                assert a.test_version is None and testsets.current_version(s, ROUTE) == 2
    assert [len(x) for x in seen] == [4, 9]
    with session_scope(db_sessions) as s:
        versions = s.scalars(sa.select(Dataset).where(Dataset.name == f"test:{ROUTE}").order_by(Dataset.version)).all()
        assert [v.version for v in versions] == [1, 2]
        assert all(v.frozen and v.kind == DatasetKind.TEST for v in versions)
        assert versions[1].parent_id == versions[0].id
        assert versions[0].content_hash and versions[1].content_hash
        assert versions[0].content_hash != versions[1].content_hash
        assert versions[0].stats == {"items": 4, "added": 4} and versions[1].stats == {"items": 9, "added": 5}
        v1 = testsets.items(s, ROUTE, DatasetKind.TEST, version=1)
        assert v1 == seen[0]  # v1 did not change when v2 came
        v2 = testsets.items(s, ROUTE, DatasetKind.TEST)
        assert v2 == testsets.items(s, ROUTE, DatasetKind.TEST, version=2) == seen[1]
        assert set(request_ids(v1)) < set(request_ids(v2))
        assert sorted(i.question for i in v2) == sorted(question(i) for i in on_test)


def test_other_routes_untouched_and_reads(db_sessions) -> None:
    cfg = settings(holdout_size=3)
    on_test = questions_on(True, 0.25, 0, 4)
    on_train = questions_on(False, 0.25, 0, 4)
    with session_scope(db_sessions) as s:
        hold = [add_reviewed(s, f"Holdout question {k}?", f"holdout answer {k}") for k in range(3)]
        history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "hello"}]  # fmt: skip
        for i in on_test + on_train:
            add_reviewed(s, question(i), answer_of(i), history=history)
        for i in range(10):
            add_reviewed(s, question(i), answer_of(i), route="billing")
        a = testsets.assign_reviewed(s, ROUTE, cfg)
        assert (a.holdout, a.test, a.train) == (3, 4, 4)
    with session_scope(db_sessions) as s:
        assert set(reviewed_splits(s, "billing").values()) == {None}
        for kind in (DatasetKind.HOLDOUT, DatasetKind.TEST):
            assert testsets.items(s, "billing", kind) == []
        assert testsets.training_labels(s, "billing") == [] and testsets.labels_since(s, "billing", None) == 0
        assert s.scalar(sa.select(sa.func.count()).select_from(Dataset).where(Dataset.name.like("%billing%"))) == 0

        test = testsets.items(s, ROUTE, DatasetKind.TEST)
        assert all(i.prompt[:3] == history and i.prompt[-1]["role"] == "user" for i in test)
        gold = testsets.gold_answers(s, ROUTE)
        expected = {normalise_answer(f"Holdout question {k}?"): f"holdout answer {k}" for k in range(3)}
        expected |= {normalise_answer(question(i)): answer_of(i) for i in on_test}
        assert gold == expected
        texts = testsets.contamination_texts(s, ROUTE)
        assert sorted(texts) == sorted([f"Holdout question {k}?" for k in range(3)] + [question(i) for i in on_test])
        labels = testsets.training_labels(s, ROUTE)
        assert sorted(r["messages"][-2]["content"] for r in labels) == sorted(question(i) for i in on_train)
        assert all(r["messages"][:3] == history and r["messages"][-1]["role"] == "assistant" for r in labels)
        train_requests = {r["source_request_id"] for r in labels}
        assert not train_requests & {e.source_request_id for e in hold}
        assert testsets.labels_since(s, ROUTE, None) == 4
        assert testsets.labels_since(s, ROUTE, utcnow()) == 0
        assert testsets.labels_since(s, ROUTE, utcnow() - timedelta(hours=1)) == 4
        # A stored TestItem exports as the row lm-eval reads.
        row = test[0].to_row()
        assert row["messages"] == test[0].prompt and row["answer"] == test[0].answer


def test_labels_since_counts_only_later_training_labels(db_sessions) -> None:
    cfg = settings(holdout_size=1)
    on_train = questions_on(False, 0.25, 0, 5)
    on_test = questions_on(True, 0.25, 0, 2)
    with session_scope(db_sessions) as s:
        add_reviewed(s, "the holdout", "x")
        for i in on_train[:2] + on_test[:1]:
            add_reviewed(s, question(i), answer_of(i))
        testsets.assign_reviewed(s, ROUTE, cfg)
        mark = s.scalar(sa.select(sa.func.max(Example.created_at)))
    with session_scope(db_sessions) as s:
        for i in on_train[2:] + on_test[1:]:
            add_reviewed(s, question(i), answer_of(i))
        # Not assigned yet: a label without a side does not count.
        assert testsets.labels_since(s, ROUTE, mark) == 0
        testsets.assign_reviewed(s, ROUTE, cfg)
        assert testsets.labels_since(s, ROUTE, mark) == 3
        assert testsets.labels_since(s, ROUTE, None) == 5


def test_assign_twice_is_idempotent(db_sessions) -> None:
    cfg = settings(holdout_size=4)
    with session_scope(db_sessions) as s:
        for i in range(40):
            add_reviewed(s, question(i), answer_of(i))
        first = testsets.assign_reviewed(s, ROUTE, cfg)
    with session_scope(db_sessions) as s:
        before = (
            s.scalar(sa.select(sa.func.count()).select_from(Example)),
            s.scalar(sa.select(sa.func.count()).select_from(Dataset)),
            reviewed_splits(s),
        )
        again = testsets.assign_reviewed(s, ROUTE, cfg)
        assert (again.holdout, again.test, again.train, again.test_version) == (0, 0, 0, None)
        assert again.holdout_frozen
    with session_scope(db_sessions) as s:
        after = (
            s.scalar(sa.select(sa.func.count()).select_from(Example)),
            s.scalar(sa.select(sa.func.count()).select_from(Dataset)),
            reviewed_splits(s),
        )
        assert after == before
        assert testsets.current_version(s, ROUTE) == first.test_version == 1


def test_no_test_item_survives_curation_of_training_data(db_sessions, tmp_path: Path) -> None:
    """The contamination rule, fed `contamination_texts`, drops a training row that asks a test question
    (here written differently, so the question hash put it on the other side) and keeps a different
    phrasing of the same fact."""
    from training.curation import CurationConfig, curate

    cfg = settings(holdout_size=2)
    on_test = questions_on(True, 0.25, 0, 3)
    on_train = questions_on(False, 0.25, 0, 3)
    with session_scope(db_sessions) as s:
        add_reviewed(s, "How do I reset my password?", "Use the link on the sign-in page.")
        add_reviewed(s, "Which plan includes support?", "The Pro plan.")
        for i in on_test + on_train:
            add_reviewed(s, question(i), answer_of(i))
        testsets.assign_reviewed(s, ROUTE, cfg)
        texts = testsets.contamination_texts(s, ROUTE)
        labels = testsets.training_labels(s, ROUTE)
    target = on_test[0]
    leaked = question(target).rstrip("?").lower() + " ?!"  # the test question, spelled differently
    rephrased = f"How many cents per kWh does tariff T{target:04d} cost?"
    rows = [{"messages": r["messages"]} for r in labels]
    rows.append(
        {"messages": [{"role": "user", "content": leaked}, {"role": "assistant", "content": answer_of(target)}]}
    )
    rows.append(
        {"messages": [{"role": "user", "content": rephrased}, {"role": "assistant", "content": answer_of(target)}]}
    )
    rows.append({"messages": [{"role": "user", "content": "how do i reset my password"},
                              {"role": "assistant", "content": "Use the link."}]})  # fmt: skip
    src = write_jsonl(tmp_path / "snapshot.jsonl", rows)
    report = curate(src, tmp_path / "out", CurationConfig(validation_fraction=0.0, near_dedup=False), test_texts=texts)
    kept = [r["messages"][0]["content"] for _, r in read_jsonl(tmp_path / "out" / "train.jsonl")]
    assert leaked not in kept and "how do i reset my password" not in kept
    assert rephrased in kept
    assert sorted(q for q in kept if q != rephrased) == sorted(question(i) for i in on_train)
    assert report.rejected_by_rule.get("contamination") == 2
    # No item of the test set or holdout is in what curation kept.
    kept_norm = {" ".join(normalise_answer(q).rstrip("?").split()) for q in kept}
    assert not kept_norm & {" ".join(normalise_answer(t).rstrip("?").split()) for t in texts}
