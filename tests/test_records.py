"""The traffic log never stalls: hostile values are stored clean, a refused row goes to the dead-letter
file without blocking its batch, a full queue spills to disk and is replayed, shutdown keeps its
deadline. On SQLite and on PostgreSQL; the database is real, only outages are injected."""

from __future__ import annotations

import asyncio
import json
import uuid

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from core.db import Request, utcnow
from core.settings import GatewaySettings
from gateway.metrics import Metrics
from gateway.recorder import TrafficLog, private
from gateway.records import clean_row, reason_of


def row(**extra) -> dict:
    return {
        "id": uuid.uuid4().hex,
        "created_at": utcnow(),
        "route": "base",
        "endpoint": "chat",
        "stream": False,
        "status_code": 200,
        "prompt_text": "user: hi",
        "answer_text": "hello",
        **extra,
    }


def stored(sessions, ids: list[str]) -> dict[str, Request]:
    with sessions() as session:
        return {r.id: r for r in session.scalars(select(Request).where(Request.id.in_(ids)))}


def run(coroutine):
    return asyncio.run(coroutine)


async def write(log: TrafficLog, rows: list[dict]) -> None:
    log.start()
    for r in rows:
        log.record(r)
    await log.close()


def test_values_a_client_can_send_are_stored_clean(db_sessions, tmp_path):
    hostile = row(
        end_user="u" * 5000,
        prompt_text="lone \ud800 surrogate and NUL \x00 here",
        answer_text="\udfff\x00",
        request_json={"messages": [{"content": "a\x00b\ud83d"}], "temperature": float("nan"), "\x00k": float("inf")},
        response_json={"x": [float("-inf"), "\udc00"]},
        risk=float("nan"),
    )
    plain = row()
    log = TrafficLog(db_sessions, GatewaySettings(log_batch_size=10), Metrics(), backoff_s=(0.0, 0.0), var_dir=tmp_path)
    run(write(log, [hostile, plain]))
    rows = stored(db_sessions, [hostile["id"], plain["id"]])
    assert set(rows) == {hostile["id"], plain["id"]}
    got = rows[hostile["id"]]
    assert got.prompt_text == "lone \ufffd surrogate and NUL \ufffd here" and got.answer_text == "\ufffd\ufffd"
    assert len(got.end_user) == 200 and got.risk is None
    assert got.request_json == {"messages": [{"content": "a\ufffdb\ufffd"}], "temperature": None, "\ufffdk": None}
    assert got.response_json == {"x": [None, "\ufffd"]}
    assert not list(tmp_path.glob("*dead-letters*"))


def test_a_refused_row_is_dead_lettered_and_its_batch_written(db_sessions, tmp_path):
    metrics = Metrics()
    good = [row() for _ in range(3)]
    bad = row(created_at="not a date")  # no cleaning makes this storable: the database refuses it
    log = TrafficLog(db_sessions, GatewaySettings(log_batch_size=10), metrics, backoff_s=(0.0, 0.0), var_dir=tmp_path)
    run(write(log, [good[0], bad, good[1], good[2]]))
    assert set(stored(db_sessions, [r["id"] for r in [*good, bad]])) == {r["id"] for r in good}
    assert log.dead_letters.path.name == f"traffic-{log.owner.name}.dead-letters.jsonl"
    letters = [json.loads(line) for line in log.dead_letters.path.read_text().splitlines()]
    assert [letter["row"]["id"] for letter in letters] == [bad["id"]] and letters[0]["reason"]
    assert metrics.registry.get_sample_value("tunegate_traffic_log_dead_letters_total") == 1


def test_a_row_already_stored_is_not_inserted_twice_nor_dead_lettered(db_sessions, tmp_path):
    first = row(answer_text="stored with its review item")
    with db_sessions() as session:  # the review path stored this exchange's row already
        session.add(Request(**first))
        session.commit()
    again, other = dict(first, answer_text="second try"), row()
    log = TrafficLog(db_sessions, GatewaySettings(log_batch_size=10), Metrics(), backoff_s=(0.0, 0.0), var_dir=tmp_path)
    run(write(log, [again, other]))
    rows = stored(db_sessions, [first["id"], other["id"]])
    assert set(rows) == {first["id"], other["id"]} and rows[first["id"]].answer_text == "stored with its review item"
    assert not list(tmp_path.glob("*dead-letters*"))


def test_a_full_queue_spills_to_disk_and_is_replayed(db_sessions, tmp_path):
    metrics = Metrics()
    rows = [row() for _ in range(5)]
    settings = GatewaySettings(log_queue_max=2, store_text=False)

    async def scenario():
        log = TrafficLog(db_sessions, settings, metrics, backoff_s=(0.0, 0.0), var_dir=tmp_path)
        for r in rows:  # the writer is not running: the queue fills up
            log.record(r)
        await asyncio.gather(*log._spilling)
        spilled = [json.loads(line) for line in log.spill.path.read_text().splitlines()]
        await write(log, [])  # start, then close: the queue and the spill file go to the database
        return spilled

    spilled = run(scenario())
    assert {s["id"] for s in spilled} == {r["id"] for r in rows[2:]}
    assert all(s["prompt_text"] is None for s in spilled)  # privacy holds on disk too
    assert set(stored(db_sessions, [r["id"] for r in rows])) == {r["id"] for r in rows}
    assert metrics.registry.get_sample_value("tunegate_traffic_log_rows_spilled_total") == 3
    assert not list(tmp_path.glob("traffic-*")), "spill replayed, journal dropped, lock released"


def test_shutdown_keeps_its_deadline_and_spills_what_is_left(db_sessions, tmp_path):
    def down():  # fault injection: the database is unreachable for the whole shutdown
        raise OperationalError("connect", {}, ConnectionRefusedError("database is down"))

    rows = [row() for _ in range(4)]
    settings = GatewaySettings(log_close_timeout_s=0.2, log_flush_interval_s=0.01)
    first = TrafficLog(down, settings, Metrics(), backoff_s=(0.05, 0.05), var_dir=tmp_path)
    run(write(first, rows))
    assert stored(db_sessions, [r["id"] for r in rows]) == {}
    assert len(first.spill.path.read_text().splitlines()) == 4
    assert not first.owner.lock_path.exists(), "closed: its spill is left for the next start"

    run(write(TrafficLog(db_sessions, settings, Metrics(), var_dir=tmp_path), []))  # the next start writes them
    assert set(stored(db_sessions, [r["id"] for r in rows])) == {r["id"] for r in rows}


def test_clean_row_cuts_only_bounded_columns():
    cleaned = clean_row({"route": "r" * 300, "prompt_text": "p" * 300, "latency_ms": float("inf")})
    assert len(cleaned["route"]) == 200 and len(cleaned["prompt_text"]) == 300 and cleaned["latency_ms"] is None


def test_error_texts_follow_the_privacy_settings():
    error = "vLLM: prompt 'mail jane@example.com the tariff' is too long"
    masked = private({"error": error}, GatewaySettings(mask_pii=True))["error"]
    assert "jane@example.com" not in masked and "[EMAIL]" in masked
    bare = private({"error": error}, GatewaySettings(store_text=False))["error"]
    assert "tariff" not in bare and bare.startswith("vLLM: prompt") and bare.endswith("is too long")
    assert private({"error": error}, GatewaySettings())["error"] == error


def test_a_dead_letter_reason_quotes_no_value():
    try:
        raise ValueError('invalid input syntax for type integer: "jane@example.com"\nDETAIL: more')
    except ValueError as err:
        assert reason_of(err) == 'ValueError: invalid input syntax for type integer: "…"'


def test_a_journalled_row_survives_a_crash_and_is_stored_once(db_sessions, tmp_path):
    """`record_durably` puts the row (private and clean) in the journal before it returns; a process
    that dies before the writer ran leaves the journal, the next start replays it; rows stored
    already are skipped; once the queue has drained the journal is gone."""
    settings = GatewaySettings(log_batch_size=10, mask_pii=True)
    first, second = row(prompt_text="user: mail jane@example.com"), row()

    async def crash_before_the_writer_runs() -> None:
        log = TrafficLog(db_sessions, settings, Metrics(), backoff_s=(0.0, 0.0), var_dir=tmp_path)
        await log.record_durably(first)  # never started: a SIGKILL would lose the in-memory queue
        await log.record_durably(second)

    run(crash_before_the_writer_runs())
    (journal_path,) = tmp_path.glob("traffic-*.journal.jsonl")
    journal = journal_path.read_text()
    assert first["id"] in journal and second["id"] in journal and "jane@example.com" not in journal
    run(write(TrafficLog(db_sessions, settings, Metrics(), backoff_s=(0.0, 0.0), var_dir=tmp_path), [second]))
    rows = stored(db_sessions, [first["id"], second["id"]])
    assert set(rows) == {first["id"], second["id"]} and "jane@example.com" not in rows[first["id"]].prompt_text

    async def drained() -> None:
        log = TrafficLog(db_sessions, settings, Metrics(), backoff_s=(0.0, 0.0), var_dir=tmp_path)
        log.start()
        await log.record_durably(row())
        for _ in range(200):
            if not list(tmp_path.glob("traffic-*journal*")):
                break
            await asyncio.sleep(0.05)
        await log.close()

    run(drained())
    assert not list(tmp_path.glob("traffic-*journal*")), "the journal is dropped once its rows are stored"
