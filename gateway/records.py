"""Traffic-log rows on their way into the `requests` table, and the two files they go to when they cannot.

* `clean_row` makes any value a client can put in JSON storable on SQLite and PostgreSQL alike: lone
  surrogates and NUL become U+FFFD (one code point for one, so span offsets still fit), NaN and
  +-Infinity become null, and a string longer than its `String(n)` column is cut to `n`. JSON keys
  are cleaned like values.
* `store_rows` inserts a batch in one statement; when that fails for a reason other than an outage
  (`is_outage`: the database is down, locked or unreachable, which the caller retries), it inserts
  the rows one by one: a row already stored under its id (an earlier try, or the review path) is
  skipped, any other row that fails is handed to `dead_letter` with its reason. One bad row never
  blocks the others.
* `RowFile` is a JSONL file of rows under `var_dir`, one set per process (`Owner`):
  `traffic-<owner>.journal.jsonl` (every answered row, before the answer leaves),
  `traffic-<owner>.spill.jsonl` (rows the bounded queue had no room for, or left at shutdown; replayed
  into the table on start and when the queue has room) and `traffic-<owner>.dead-letters.jsonl`
  (`{"at", "reason", "row"}` per line, kept for an operator). Rows are written there after
  `private()`, so the files hold no more than the table would.
* `Owner` makes those files one process's own, so several processes (gateway replicas, uvicorn
  workers) can share one `var_dir` on a shared volume. `<owner>` is `<host>-<pid>-<random>`; the
  process holds an exclusive `fcntl.flock` on `traffic-<owner>.lock` for as long as it lives (the
  kernel, or the NFSv4 server, drops the lock when the process dies, SIGKILL included).
  `Owner.adopt_orphans()` (on start) renames into this process's own replay files the journal and
  spill files of every owner whose lock it can take (its process is dead) or whose lock file is gone
  (it closed with rows left to write), and the single files of earlier versions
  (`traffic-journal.jsonl`, `traffic-spill.jsonl`); the files of an owner whose lock is held (a live
  process) are never touched. A lock file appears already locked (created under a temporary name,
  locked, then renamed), and an adopter checks after locking that the path is still the file it
  locked, so two adopters never replay one orphan twice (and rows replayed twice are skipped by id).
  Dead-letter files are never adopted: they wait for an operator under their owner's name.
  The volume must support `flock` between the processes that share it (local disks; NFSv4, where
  Linux maps `flock` to NFS byte-range locks).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import insert, select
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, StatementError
from sqlalchemy.orm import sessionmaker

from core.db import Request, utcnow

log = logging.getLogger("tunegate.traffic")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"
_QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")
JSON_COLUMNS = ("request_json", "response_json", "guardrail_scores")
DATETIME_COLUMNS = ("created_at",)
LIMITS = {c.name: c.type.length for c in Request.__table__.columns if isinstance(c.type, sa.String) and c.type.length}
JOURNAL, SPILL, DEAD_LETTERS = "journal", "spill", "dead-letters"  # the kinds of an owner's files
LEGACY = ("traffic-journal.jsonl", "traffic-spill.jsonl")  # one file for every process (before owners)
_LEGACY = re.compile(r"traffic-(journal|spill)\.jsonl(\.[0-9a-f]+\.replay)?")
_OWNED = re.compile(
    r"traffic-(?P<owner>[A-Za-z0-9_-]+)\.(?P<kind>lock|journal\.jsonl|spill\.jsonl)(\.[0-9a-f]+\.replay)?"
)


def clean_text(text: str, limit: int | None = None) -> str:
    text = _UNSTORABLE.sub(REPLACEMENT, text)
    return text[:limit] if limit is not None and len(text) > limit else text


def clean_json(value: Any) -> Any:
    """`value` (parsed JSON) as every database stores it (see the module docstring)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_json(v) for k, v in value.items()}
    return value


def clean_row(row: dict[str, Any]) -> dict[str, Any]:
    """A new `requests` row whose every value the database accepts."""
    out = {}
    for name, value in row.items():
        if name in JSON_COLUMNS:
            value = clean_json(value)
        elif isinstance(value, str):
            value = clean_text(value, LIMITS.get(name))
        elif isinstance(value, float) and not math.isfinite(value):
            value = None
        out[name] = value
    return out


def is_outage(err: BaseException) -> bool:
    """True unless the database refused the row itself (a statement or value error): down, locked,
    unreachable or anything unknown is retried later rather than dead-lettered."""
    if isinstance(err, OperationalError | InterfaceError | DisconnectionError) or getattr(
        err, "connection_invalidated", False
    ):
        return True
    return not isinstance(err, StatementError | ValueError | TypeError | UnicodeError)


def redact(text: str) -> str:
    """`text` with every quoted fragment (where drivers and validators echo the value they refused)
    replaced by `"…"`."""
    return _QUOTED.sub('"…"', text)


def reason_of(err: BaseException) -> str:
    """A one-line reason for a refused row: the driver's first line, quoted values redacted (never the
    statement's parameters, never the client's text)."""
    cause = getattr(err, "orig", None) or err
    first = (str(cause).strip().splitlines() or [""])[0]
    return redact(f"{type(cause).__name__}: {first}")[:500]


def store_rows(
    sessions: sessionmaker, rows: list[dict[str, Any]], dead_letter: Callable[[dict[str, Any], str], None]
) -> int:
    """Insert `rows`; returns how many were newly stored. Raises only on an outage (see the module docstring)."""
    if not rows:
        return 0
    try:
        with sessions() as session:
            session.execute(insert(Request), rows)
            session.commit()
        return len(rows)
    except Exception as err:
        if is_outage(err):
            raise
        log.warning(
            "a batch of %d traffic-log rows was refused (%s); storing them one by one", len(rows), reason_of(err)
        )
    stored = 0
    for row in rows:
        try:
            with sessions() as session:
                session.execute(insert(Request), [row])
                session.commit()
            stored += 1
        except Exception as err:
            if is_outage(err):
                raise
            if _exists(sessions, row.get("id")):
                log.info("traffic-log row %s is already stored; skipped", row.get("id"))
                continue
            dead_letter(row, reason_of(err))
    return stored


def _exists(sessions: sessionmaker, row_id: Any) -> bool:
    if not isinstance(row_id, str):
        return False
    with sessions() as session:
        return session.scalar(select(Request.id).where(Request.id == row_id)) is not None


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else str(value)


class RowFile:
    """A JSONL file of rows (see the module docstring); safe to append to from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        lines = "".join(json.dumps(r, default=_jsonable, ensure_ascii=True) + "\n" for r in records)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as out:
                out.write(lines)

    def take(self) -> list[Path]:
        """Move the file aside to be replayed (appends go on into a new one); returns every file awaiting
        replay, including those a crash or an outage left from an earlier replay."""
        with self._lock:
            if self.path.exists():
                self.path.rename(self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.replay"))
        return sorted(self.path.parent.glob(f"{self.path.name}.*.replay"))

    @staticmethod
    def rows(path: Path) -> Iterator[dict[str, Any]]:
        """The rows of a taken file, datetimes parsed back; a line cut short by a crash is skipped."""
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                try:
                    row = json.loads(line)
                except ValueError:
                    log.warning("skipping an unreadable line of %s", path)
                    continue
                for name in DATETIME_COLUMNS:
                    if isinstance(row.get(name), str):
                        row[name] = datetime.fromisoformat(row[name])
                yield row


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "host")[:63]


_GONE = "gone"


def _lock_if_dead(path: Path):
    """`path` opened and exclusively locked when its owner is dead; `_GONE` when the file is gone (its
    owner closed, or another adopter removed it); None when a live process holds the lock."""
    try:
        held = path.open("r+b")
    except FileNotFoundError:
        return _GONE
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live process (EWOULDBLOCK), or the lock cannot be taken: leave it alone
        held.close()
        return None
    try:
        same = os.stat(path).st_ino == os.fstat(held.fileno()).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # another adopter took this orphan and removed its lock file meanwhile
        held.close()
        return _GONE
    return held


class Owner:
    """This process's claim on its traffic files under `var_dir` (see the module docstring)."""

    def __init__(self, var_dir: Path) -> None:
        self.var_dir, self.pid = var_dir, os.getpid()
        self.name = f"{_host()}-{self.pid}-{uuid.uuid4().hex[:8]}"
        self.lock_path = var_dir / f"traffic-{self.name}.lock"
        self._held = None

    def path(self, kind: str) -> Path:
        return self.var_dir / f"traffic-{self.name}.{kind}.jsonl"

    @property
    def held(self) -> bool:
        return self._held is not None

    def acquire(self) -> None:
        """Create and lock the lock file (idempotent). It is locked before it gets its name, so no
        adopter ever sees it unlocked."""
        if self._held is not None:
            return
        self.var_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.var_dir / f".{self.lock_path.name}.{uuid.uuid4().hex[:8]}.tmp"
        held = tmp.open("w+b")
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.write(f"{self.name}\n".encode())
            held.flush()
            tmp.rename(self.lock_path)
        except BaseException:
            held.close()
            tmp.unlink(missing_ok=True)
            raise
        self._held = held

    def release(self) -> None:
        """Remove the lock file, then unlock: files left behind (rows not yet written) are orphans."""
        if self._held is None:
            return
        self.lock_path.unlink(missing_ok=True)
        self._held.close()
        self._held = None

    def adopt_orphans(self, into: RowFile) -> list[Path]:
        """Rename the journal and spill files of dead or closed owners, and the files of earlier
        versions, into `into`'s replay files (this owner's spill); returns the files adopted."""
        owners: dict[str, list[Path]] = {}
        adopted: list[Path] = []
        for path in sorted(self.var_dir.glob("traffic-*")):
            if _LEGACY.fullmatch(path.name):
                owners.setdefault("", []).append(path)
            elif (match := _OWNED.fullmatch(path.name)) and match["owner"] != self.name:
                if match["kind"] != "lock":
                    owners.setdefault(match["owner"], []).append(path)
                else:
                    owners.setdefault(match["owner"], [])
        for owner, paths in owners.items():
            lock = self.var_dir / f"traffic-{owner}.lock"
            held = _lock_if_dead(lock) if owner else _GONE
            if held is None:
                continue  # a live process: its files are its own
            try:
                for path in paths:
                    target = into.path.with_name(f"{into.path.name}.{uuid.uuid4().hex[:8]}.replay")
                    try:
                        path.rename(target)
                    except FileNotFoundError:  # another adopter (or its owner, closing) was first
                        continue
                    adopted.append(target)
                    log.warning("traffic log: replaying %s, left by a process that is gone", path.name)
                if held is not _GONE:
                    lock.unlink(missing_ok=True)
            finally:
                if held is not _GONE:
                    held.close()
        return adopted


def dead_letter_record(row: dict[str, Any], reason: str) -> dict[str, Any]:
    return {"at": utcnow().isoformat(), "reason": reason, "row": row}
