"""Engines and sessions: how a tunegate process connects to its database, SQLite or PostgreSQL.

SQLite is set up for several processes sharing one file (WAL, a busy timeout, enforced foreign
keys); PostgreSQL gets connections checked before use, since replicas outlive database restarts.

Row values (prompts, answers, e-mail addresses: PII) never reach an error message or the log: every
engine hides SQL parameters (`hide_parameters=True`: `[SQL parameters hidden ...]` where the values
were, in errors and in `echo` output), and the driver's own message loses what PostgreSQL quotes of
the data (its `DETAIL:` and `CONTEXT:` lines, e.g. `Key (email)=(bob@example.com) already exists`,
and the value in `invalid input syntax for type integer: "..."`). The error's class, SQLSTATE and
`diag` are untouched, for code that branches on them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.orm import Session, sessionmaker

# How long a SQLite writer waits for another process's write lock before "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000

# The parts of a PostgreSQL message that quote data: everything from the first DETAIL or CONTEXT line
# on, and the rejected value after "invalid input syntax for type integer: " (to the end: it may span
# lines).
_DATA_LINES_RE = re.compile(r"\n\s*(?:DETAIL|CONTEXT):.*", re.S)
_REJECTED_VALUE_RE = re.compile(r"^((?:invalid input|malformed)[^\n:]*: ).*", re.S)


def _configure_sqlite_connection(dbapi_connection: Any, _connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # SQLite ignores foreign keys unless asked, per connection.
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # WAL lets readers (the gateway) proceed while a writer (a worker) commits.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def scrub_driver_message(text: str) -> str:
    """A database driver's error message without the row data PostgreSQL quotes in it."""
    return _REJECTED_VALUE_RE.sub(r'\1"***"', _DATA_LINES_RE.sub("", text))


def _scrub_error(context: ExceptionContext) -> None:
    # The wrapped exception's message was built from the driver's; both are rewritten in place.
    orig = context.original_exception
    text = str(orig)
    clean = scrub_driver_message(text)
    if clean == text:
        return
    orig.args = (clean,)
    wrapped = context.sqlalchemy_exception
    if wrapped is not None and wrapped.args and isinstance(wrapped.args[0], str):
        wrapped.args = (wrapped.args[0].replace(text, clean), *wrapped.args[1:])


def make_engine(url: str, echo: bool = False) -> Engine:
    """An engine for `url` (`sqlite:///path` or `postgresql+psycopg://...`), ready for tunegate's use;
    its errors and echoed statements never show row values (see the module's docstring)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, echo=echo, hide_parameters=True)
        sa.event.listen(engine, "connect", _configure_sqlite_connection)
    else:
        engine = sa.create_engine(parsed, echo=echo, pool_pre_ping=True, hide_parameters=True)
    sa.event.listen(engine, "handle_error", _scrub_error)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # Objects stay readable after commit: a worker claims a job, commits, then runs it for minutes
    # without another round trip or a transaction held open.
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises."""
    with factory.begin() as session:
        yield session
