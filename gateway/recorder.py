"""The recorder: the one place that builds a request's `requests` row and stores it, and its metrics.

A row is stored one of two ways, under the same privacy rules (`private()`):

* the traffic log (`TrafficLog`): `record()` queues the row and returns; one background task writes
  the queue in batches (`log_batch_size` rows or every `log_flush_interval_s`) in a worker thread,
  so the database is never on the request's critical path. A write the database is out for is
  retried with backoff and its rows kept, and `close()` drains the queue before the process exits;
* with a review item (`Recorder.hold`), for an answer the guardrails send to review (held or
  sampled): row and item in one transaction, before the client hears back.

Privacy (`gateway.store_text`, `gateway.mask_pii`), applied in a worker thread on both paths (and to
rows spilled to disk or dead-lettered): `store_text: false` stores no text (prompt, answer, request and
response bodies, the guardrails' context and evidence; the quoted fragments of the error message);
`mask_pii` masks e-mails, phone and card numbers and national ids in all of them and in the error
(`guardrails.pii.scrub`), and drops the unsupported spans when masking moved the answer's characters.
Log lines name a request by its id, never by its text.

Never stalls (`gateway.records`): values no database stores (lone surrogates, NUL, NaN, overlong
strings) are cleaned; a row the database still refuses goes to the process's
`<var_dir>/traffic-<owner>.dead-letters.jsonl` with its reason (`tunegate_traffic_log_dead_letters_total`)
and its batch is written row by row; the queue holds `log_queue_max` rows and spills the rest to
`<var_dir>/traffic-<owner>.spill.jsonl`, replayed on start and whenever the queue is empty; `close()`
waits `log_close_timeout_s` at most, then spills.

Nothing answered is lost, even to SIGKILL (`Recorder.finish` -> `TrafficLog.record_durably`): the row,
private and clean, is appended to `<var_dir>/traffic-<owner>.journal.jsonl` (a worker thread; the page
cache keeps it when the process dies) before the client's answer is returned; the journal is dropped
each time the queue has drained into the database (and by `close()`, once every row is written or
spilled), and replayed on start (rows already stored are skipped).

Several processes on one `var_dir` (replicas and uvicorn workers on a shared volume): every TrafficLog
owns its files (`<owner>` = `<host>-<pid>-<random>`, `gateway.records.Owner`) and holds an exclusive
`flock` on `<var_dir>/traffic-<owner>.lock` from its first write (or `start()`) until `close()` or the
process's death, so dropping its journal never touches another process's rows. On start it adopts
(renames into its own spill, then replays) the journal and spill files of every owner whose lock it can
take or whose lock file is gone, and the single `traffic-journal.jsonl` / `traffic-spill.jsonl` of
earlier versions; a live process's files are never touched. A process that was forked after its
TrafficLog was made takes an owner of its own.

Retention (`purge_expired`) deletes old rows no review item or training example uses.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from sqlalchemy import delete, exists, select
from sqlalchemy.orm import sessionmaker

from core.db import Example, Request, ReviewItem, utcnow
from core.keys import Principal
from core.settings import GatewaySettings
from core.vocab import Decision, ReviewReason
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.records import (
    DEAD_LETTERS,
    JOURNAL,
    SPILL,
    Owner,
    RowFile,
    clean_row,
    dead_letter_record,
    reason_of,
    redact,
    store_rows,
)
from guardrails.pii import scrub

if TYPE_CHECKING:
    from gateway.guarding import Assessment
    from gateway.openai.schemas import ChatCompletionRequest, CompletionRequest
    from gateway.review.service import ReviewService
    from gateway.routing import Target

log = logging.getLogger("tunegate.traffic")
TEXT_FIELDS = ("prompt_text", "answer_text")
BODY_FIELDS = ("request_json", "response_json")
RETRY_AFTER_S = 5
_STOP: dict = {}  # queued by close(): everything before it gets written, then the writer ends


@dataclass(frozen=True)
class _Ready:
    """A queued row that is already private and clean (it went through the journal)."""

    row: dict[str, Any]


@dataclass
class Exchange:
    """What is known about one request as it goes through the gateway; becomes its `requests` row."""

    endpoint: str  # chat | completions
    body: ChatCompletionRequest | CompletionRequest
    caller: Principal
    end_user: str
    target: Target | None = None
    started: float = field(default_factory=time.perf_counter)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: datetime = field(default_factory=utcnow)
    upstream_s: float = 0.0
    status: int = 200
    answer: str | None = None
    response: dict | None = None
    usage: dict | None = None
    error: str | None = None
    context: str | None = None
    assessment: Assessment | None = None
    review_id: str | None = None  # set when the row went to the database with a review item

    @property
    def route(self) -> str:
        return self.body.model if self.target is None else self.target.route

    @property
    def decision(self) -> Decision | None:
        """The policy's decision for a served request (allow without guardrails); None for errors."""
        if self.status not in (200, 202):
            return None
        return Decision.ALLOW if self.assessment is None else self.assessment.decision

    def tokens(self) -> tuple[int | None, int | None]:
        usage = self.usage or {}
        return usage.get("prompt_tokens"), usage.get("completion_tokens")


def _masked(value: Any) -> Any:
    """`value` (JSON) with the PII in every string masked."""
    if isinstance(value, str):
        return scrub(value)[0]
    if isinstance(value, list):
        return [_masked(v) for v in value]
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    return value


def private(row: dict[str, Any], settings: GatewaySettings) -> dict[str, Any]:
    """The row as the privacy settings let it be stored (a new dict): the one rule for both paths."""
    if settings.store_text and not settings.mask_pii:
        return row
    row = dict(row)
    document = dict(row.get("guardrail_scores") or {}) or None
    if isinstance(row.get("error"), str):  # vLLM's and validators' messages may quote the client's text
        row["error"] = scrub(row["error"])[0] if settings.mask_pii else row["error"]
        row["error"] = row["error"] if settings.store_text else redact(row["error"])
    if not settings.store_text:
        row.update(dict.fromkeys((*TEXT_FIELDS, *BODY_FIELDS)))
        if document:
            document.pop("context", None)
            document.pop("evidence", None)
    else:
        answer = row.get("answer_text")
        for name in (*TEXT_FIELDS, *BODY_FIELDS):
            row[name] = _masked(row.get(name))
        if document:
            document = _masked(document)
            if answer != row["answer_text"]:  # offsets into the original no longer fit the masked answer
                document["unsupported_spans"] = []
    if "guardrail_scores" in row:
        row["guardrail_scores"] = document
    return row


class ReviewStoreUnavailable(GatewayError):
    """A held answer could not be stored for review (the database is down): fail closed, 503."""

    status_code, type, code = 503, "service_unavailable", "review_store_unavailable"


class TrafficLog:
    """The batched writer of the `requests` table (see the module docstring)."""

    def __init__(
        self,
        sessions: sessionmaker,
        settings: GatewaySettings,
        metrics: Metrics,
        backoff_s: tuple[float, float] = (0.5, 30.0),
        var_dir: Path = Path("var"),
    ) -> None:
        self.sessions, self.settings, self.metrics = sessions, settings, metrics
        self.backoff_s = backoff_s  # first and longest wait between retries of a failed write
        self.queue: asyncio.Queue[dict] = asyncio.Queue(maxsize=settings.log_queue_max)
        self.var_dir = var_dir
        self._owning = threading.Lock()
        self._own(Owner(var_dir))
        self._journaling = 0  # rows between their journal append and their place in the queue
        self._task: asyncio.Task | None = None
        self._batch: list[dict] = []  # the batch being written (spilled if shutdown cannot wait for it)
        self._spilling: set[asyncio.Task] = set()
        self.written = 0
        self.spilled_rows = _counter(metrics, "tunegate_traffic_log_rows_spilled", "Traffic-log rows spilled to disk.")
        self.dead_lettered = _counter(
            metrics, "tunegate_traffic_log_dead_letters", "Traffic-log rows the database refused (dead-letter file)."
        )

    def _own(self, owner: Owner) -> None:
        self.owner = owner
        self.journal, self.spill = RowFile(owner.path(JOURNAL)), RowFile(owner.path(SPILL))
        self.dead_letters = RowFile(owner.path(DEAD_LETTERS))

    def _claim(self) -> None:
        """Hold this process's lock before its first file is written (a new owner after a fork)."""
        with self._owning:
            if self.owner.pid != os.getpid():
                self._own(Owner(self.var_dir))
            self.owner.acquire()

    def start(self) -> None:
        self._claim()
        self._task = asyncio.create_task(self._run(), name="traffic-log-writer")

    def record(self, row: dict) -> None:
        """Queue a row (as built; `private()` is applied when it is written). When the queue is full the
        row spills to disk from a worker thread, to be replayed when the queue has room."""
        try:
            self.queue.put_nowait(row)
        except asyncio.QueueFull:
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._spill, [row]))
            self._spilling.add(task)
            task.add_done_callback(self._spilling.discard)
        self.metrics.log_queue.set(self.queue.qsize())

    async def record_durably(self, row: dict) -> None:
        """`record()`, after the row (private and clean) is in the journal: a crash, even SIGKILL, after
        this returns cannot lose it (the next start replays the journal)."""
        self._journaling += 1
        try:
            ready = await asyncio.to_thread(self._journal, row)
            self.record(_Ready(ready))
        finally:
            self._journaling -= 1

    def _journal(self, row: dict) -> dict:
        ready = clean_row(private(row, self.settings))
        self._claim()
        self.journal.append([ready])
        return ready

    def _ready(self, item: dict | _Ready) -> dict:
        return item.row if isinstance(item, _Ready) else clean_row(private(item, self.settings))

    def _spill(self, rows: list[dict | _Ready]) -> None:
        self._claim()
        self.spill.append([self._ready(row) for row in rows])
        self.spilled_rows.inc(len(rows))
        log.warning("traffic log: %d row(s) spilled to %s", len(rows), self.spill.path)

    def _drop_journal(self) -> None:
        """Every journalled row is in the database (the queue is empty and nothing is on its way)."""
        for path in self.journal.take():
            path.unlink(missing_ok=True)

    def _dead_letter(self, row: dict, reason: str) -> None:
        self._claim()
        self.dead_letters.append([dead_letter_record(row, reason)])
        self.dead_lettered.inc()
        log.error(
            "traffic log: row %s refused by the database (%s); kept in %s",
            row.get("id"),
            reason,
            self.dead_letters.path,
        )

    async def _next_batch(self) -> tuple[list[dict], bool]:
        """Up to `log_batch_size` rows, waiting at most the flush interval after the first; and
        whether `close()` asked the writer to stop (the stop marker is queued after every row)."""
        first = await self.queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.log_flush_interval_s
        while len(batch) < self.settings.log_batch_size:
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            try:
                item = await asyncio.wait_for(self.queue.get(), timeout)
            except TimeoutError:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    async def _run(self) -> None:
        await self._replay(journal=True)
        while True:
            batch, stop = await self._next_batch()
            if batch:
                self._batch = batch
                await self._write_with_retry(batch)
                self._batch = []
            if stop:
                return
            if self.queue.empty():  # room again: rows spilled meanwhile go in now
                await self._replay()
                if self.queue.empty() and not self._journaling and not self._spilling:
                    await asyncio.to_thread(self._drop_journal)

    async def _write_with_retry(self, batch: list[dict], ready: bool = False) -> None:
        """Store `batch` (`ready`: already private and clean, as spilled), retrying while the database is out."""
        delay, longest = self.backoff_s
        while True:
            try:
                stored = await asyncio.to_thread(self._write, batch, ready)
                break
            except Exception:  # the database is down or busy: keep the rows, try again
                log.exception("writing %d traffic-log rows failed; retrying in %.1f s", len(batch), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)
        self.written += stored
        self.metrics.log_written.inc(stored)
        self.metrics.log_queue.set(self.queue.qsize())

    def _write(self, batch: list[dict], ready: bool = False) -> int:
        rows = batch if ready else [self._ready(item) for item in batch]
        return store_rows(self.sessions, rows, self._dead_letter)

    async def _replay(self, journal: bool = False) -> None:
        """Write the spilled rows (see `gateway.records`), and on start what a crash left in the journal
        and what dead or closed processes left on this `var_dir` (adopted into this process's spill);
        a file stays until all its rows are stored (rows stored already are skipped)."""

        def taken() -> list[Path]:
            if journal:
                try:
                    self.owner.adopt_orphans(into=self.spill)
                except OSError:  # the folder cannot be read: this process's own rows still go in
                    log.exception("traffic log: could not look for files left by other processes")
            return (self.journal.take() if journal else []) + self.spill.take()

        for path in await asyncio.to_thread(taken):
            rows = await asyncio.to_thread(lambda p=path: list(RowFile.rows(p)))
            size = self.settings.log_batch_size
            for i in range(0, len(rows), size):
                await self._write_with_retry(rows[i : i + size], ready=True)
            await asyncio.to_thread(path.unlink, True)

    async def close(self) -> None:
        """Write every row recorded so far, then stop the writer; what `log_close_timeout_s` leaves
        unwritten (the database is down) spills to disk, to be written on the next start."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.log_close_timeout_s
        cut_short = False
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(self.queue.put(_STOP), deadline - loop.time())
                await asyncio.wait_for(asyncio.shield(self._task), max(0.0, deadline - loop.time()))
            except TimeoutError:
                cut_short = True
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        if self._spilling:
            await asyncio.gather(*self._spilling, return_exceptions=True)
        rest = list(self._batch)
        self._batch = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is not _STOP:
                rest.append(item)
        if rest:  # never wait on the database here: the next start writes them
            await asyncio.to_thread(self._spill, rest)
        self.metrics.log_queue.set(self.queue.qsize())
        if not self._journaling:  # every journalled row is stored or spilled: release the files
            if not cut_short:  # (a replay cut short may have left journal rows in neither)
                await asyncio.to_thread(self._drop_journal)
            with self._owning:
                self.owner.release()


def _counter(metrics: Metrics, name: str, documentation: str) -> Counter:
    """A counter in the app's registry, made once per registry (tests build several logs per `Metrics`)."""
    existing = getattr(metrics, "_traffic_counters", {})
    if name not in existing:
        existing[name] = Counter(name, documentation, registry=metrics.registry)
        metrics._traffic_counters = existing
    return existing[name]


def purge_expired(sessions: sessionmaker, retention_days: int) -> int:
    """Delete traffic-log rows older than the retention that nothing else points at; returns how many."""
    cutoff = utcnow() - timedelta(days=retention_days)
    referenced = exists().where(ReviewItem.request_id == Request.id)
    used = exists().where(Example.source_request_id == Request.id)
    with sessions() as session:
        ids = session.scalars(select(Request.id).where(Request.created_at < cutoff, ~referenced, ~used)).all()
        if ids:
            session.execute(delete(Request).where(Request.id.in_(ids)))
            session.commit()
    return len(ids)


class Recorder:
    """Builds the row of an exchange and stores it once: with its review item, or in the traffic log."""

    def __init__(self, traffic: TrafficLog, review: ReviewService, metrics: Metrics, settings: GatewaySettings):
        self.traffic, self.review, self.metrics, self.settings = traffic, review, metrics, settings
        self.sample_failures = _counter(
            metrics, "tunegate_review_sample_failures", "Sampled answers the review store could not take."
        )

    def row(self, ex: Exchange) -> dict[str, Any]:
        """The `requests` row of the exchange as it stands (before `private()`)."""
        target, a = ex.target, ex.assessment
        prompt_tokens, completion_tokens = ex.tokens()
        return {
            "id": ex.id,
            "created_at": ex.created_at,
            "api_key_id": ex.caller.key_id,
            "end_user": ex.end_user,
            "route": ex.route,
            "adapter_id": target.adapter_id if target else None,
            "endpoint": ex.endpoint,
            "stream": ex.body.stream,
            "status_code": ex.status,
            "request_json": ex.body.model_dump(exclude_unset=True),
            "response_json": ex.response,
            "prompt_text": ex.body.prompt_text(),
            "answer_text": ex.answer,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "latency_ms": (time.perf_counter() - ex.started) * 1000,
            "upstream_latency_ms": ex.upstream_s * 1000 if ex.upstream_s else None,
            "guardrail_ms": a.seconds * 1000 if a else None,
            "risk": a.risk if a else None,
            "decision": ex.decision,
            "guardrail_scores": a.stored() if a else None,
            "error": ex.error,
        }

    async def hold(self, ex: Exchange, reason: ReviewReason) -> str | None:
        """Store the row with a pending review item (one transaction, before the client hears back).

        Fails closed: when the review store cannot take a held answer, `ReviewStoreUnavailable` (503)
        is raised and the answer is never released unchecked. A sampled answer was allowed anyway: a
        failure to store it is logged and counted (`tunegate_review_sample_failures_total`), None is
        returned and the row goes to the traffic log as any other."""
        try:
            ex.review_id = await asyncio.to_thread(self._store_with_review, self.row(ex), reason)
        except Exception as err:
            if reason == ReviewReason.HELD:
                log.error("request %s: the review store refused a held answer (%s); 503", ex.id, reason_of(err))
                raise ReviewStoreUnavailable(
                    "this answer must be reviewed before it is released, and the review queue is unavailable "
                    "right now; retry later",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                ) from None
            self.sample_failures.inc()
            log.warning("request %s: a sampled answer was not stored for review (%s)", ex.id, reason_of(err))
            return None
        return ex.review_id

    def _store_with_review(self, row: dict[str, Any], reason: ReviewReason) -> str:
        return self.review.hold(clean_row(private(row, self.settings)), reason=reason)

    def begin(self) -> None:
        self.metrics.in_flight.inc()

    async def finish(self, ex: Exchange) -> None:
        """The request is over: its metrics, and its row to the traffic log (journalled before this returns)
        unless it was stored with a review item."""
        total_s = time.perf_counter() - ex.started
        m, a = self.metrics, ex.assessment
        route = m.route_label(ex.route)  # the client named it: a made-up name must not grow the registry
        m.in_flight.dec()
        version = ex.target.adapter_version if ex.target else "none"
        m.requests.labels(route=route, adapter_version=version, status=str(ex.status)).inc()
        m.request_seconds.labels(route=route).observe(total_s)
        if ex.upstream_s:
            m.upstream_seconds.labels(route=route).observe(ex.upstream_s)
            m.overhead_seconds.labels(route=route).observe(max(0.0, total_s - ex.upstream_s))
        if a is not None:
            m.guardrail_seconds.labels(route=route).observe(a.seconds)
        if ex.decision is not None:
            m.decisions.labels(route=route, decision=ex.decision).inc()
        for kind, tokens in zip(("prompt", "completion"), ex.tokens(), strict=True):
            if tokens:
                m.tokens.labels(route=route, kind=kind).inc(tokens)
        if ex.review_id is None:
            await self.traffic.record_durably(self.row(ex))
