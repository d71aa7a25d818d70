"""The traffic log: every request, answer, usage, latency, adapter version and decision, stored
without putting the database on the request's critical path.

Handlers `record()` a row into an in-process queue and return; one background task writes the
queue in batches (`log_batch_size` rows or every `log_flush_interval_s`) in a worker thread. A
failed write is retried with backoff and its rows kept, and `close()` drains the queue before the
process exits, so a clean shutdown loses nothing. Optional PII masking happens before the row is
queued; retention deletes old rows that no review item or training example points at.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from sqlalchemy import delete, exists, insert, select
from sqlalchemy.orm import sessionmaker

from core.db import Example, Request, ReviewItem, utcnow
from core.settings import GatewaySettings
from gateway.metrics import Metrics
from guardrails.pii import scrub

log = logging.getLogger("tunegate.traffic")
TEXT_FIELDS = ("prompt_text", "answer_text")
_STOP: dict = {}  # queued by close(): everything before it gets written, then the writer ends


class TrafficLog:
    def __init__(self, sessions: sessionmaker, settings: GatewaySettings, metrics: Metrics) -> None:
        self.sessions, self.settings, self.metrics = sessions, settings, metrics
        self.queue: asyncio.Queue[dict] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.written = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="traffic-log-writer")

    def record(self, row: dict) -> None:
        if not self.settings.store_text:
            for name in (*TEXT_FIELDS, "request_json", "response_json"):
                row[name] = None
        elif self.settings.mask_pii:
            for name in TEXT_FIELDS:
                if row.get(name):
                    row[name] = scrub(row[name])[0]
            row["request_json"] = row["response_json"] = None  # raw bodies would carry the unmasked text
        self.queue.put_nowait(row)
        self.metrics.log_queue.set(self.queue.qsize())

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
        while True:
            batch, stop = await self._next_batch()
            if batch:
                await self._write_with_retry(batch)
            if stop:
                return

    async def _write_with_retry(self, batch: list[dict]) -> None:
        delay = 0.5
        while True:
            try:
                await asyncio.to_thread(self._write, batch)
                break
            except Exception:  # the database is down or busy: keep the rows, try again
                log.exception("writing %d traffic-log rows failed; retrying in %.1f s", len(batch), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.written += len(batch)
        self.metrics.log_written.inc(len(batch))
        self.metrics.log_queue.set(self.queue.qsize())

    def _write(self, batch: list[dict]) -> None:
        with self.sessions() as session:
            session.execute(insert(Request), batch)
            session.commit()

    async def close(self) -> None:
        """Write every row recorded so far, then stop the writer."""
        if self._task is not None and not self._task.done():
            self.queue.put_nowait(_STOP)
            await self._task
        rest: list[dict] = []
        while not self.queue.empty():  # rows recorded after the stop marker (nothing should, but keep them)
            item = self.queue.get_nowait()
            if item is not _STOP:
                rest.append(item)
        if rest:
            await self._write_with_retry(rest)


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
