"""Shared fixtures: an empty database on each backend (`db_url`, `migrated_db_url`, `db_sessions`), the
embedded base model (built once, cached under var/models) and one vLLM server for the whole session
(start-up takes about 25 s on the CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tunegate.serve import ServerThread  # noqa: F401 - the tests' way to serve an app on a real port

REPO = Path(__file__).resolve().parents[1]
# The same cache `make demo` uses, so neither builds the model twice on one machine.
MODELS_DIR = Path(os.environ.get("TUNEGATE_TEST_MODELS_DIR", REPO / "var" / "models"))


def skip_or_fail(reason: str) -> None:
    """A missing service skips a test on a developer's machine, but fails the run in CI (`CI=true`):
    a suite that skips in silence can pass without ever touching PostgreSQL or the browser."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: a missing service fails the run; see deploy/scripts/ensure-services.sh)")
    pytest.skip(reason)


def postgres_server_urls() -> list[str]:
    if url := os.environ.get("TUNEGATE_TEST_POSTGRES_URL"):
        return [url]
    # The role and database `deploy/scripts/ensure-services.sh` creates (password auth works on a fresh
    # Debian install), then the trust-auth ones of a developer machine.
    return [
        "postgresql://tunegate:tunegate@127.0.0.1:5432/tunegate",
        "postgresql://root@127.0.0.1:5432/test",
        "postgresql://postgres@127.0.0.1:5432/test",
    ]


@pytest.fixture(scope="session")
def postgres_database():
    """A SQLAlchemy URL of a PostgreSQL database created for this test run, dropped afterwards."""
    import uuid

    import psycopg
    import sqlalchemy as sa

    errors = []
    for server_url in postgres_server_urls():
        try:
            admin = psycopg.connect(server_url, autocommit=True, connect_timeout=5)
            break
        except psycopg.OperationalError as err:
            errors.append(f"{server_url}: {err}".strip())
    else:
        skip_or_fail("PostgreSQL is not reachable: " + "; ".join(errors))
    name = f"tunegate_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = sa.make_url(server_url).set(drivername="postgresql+psycopg", database=name)
            yield url.render_as_string(hide_password=False)
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def reset_postgres_schema(url: str) -> None:
    """Start a test from an empty schema: the database is shared by the run's tests."""
    from core.db import make_engine

    engine = make_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP SCHEMA public CASCADE")
        connection.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend, not migrated: a SQLite file in a folder that does not exist
    yet (`make_engine` must create it), or the run's PostgreSQL database with its schema emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'var' / 'tunegate.db'}"
    url = request.getfixturevalue("postgres_database")
    reset_postgres_schema(url)
    return url


@pytest.fixture
def migrated_db_url(db_url: str) -> str:
    """`db_url` migrated to head."""
    from core.db import migrate

    migrate.upgrade(db_url)
    return db_url


@pytest.fixture
def db_sessions(migrated_db_url: str):
    """A sessionmaker on `migrated_db_url`; its engine is disposed afterwards."""
    from core.db import make_engine, session_factory

    engine = make_engine(migrated_db_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    from training.base_model import ensure_base_model

    return ensure_base_model(MODELS_DIR, progress=False).path


@pytest.fixture(scope="session")
def vllm_server(base_model_dir, tmp_path_factory):
    from core.io import free_port
    from core.settings import VllmSettings
    from core.vllm import VllmServer

    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    server = VllmServer(base_model_dir, "base", VllmSettings(), port=free_port(), log_path=log)
    with server:
        yield server


@pytest.fixture
def sqlite_db_sessions(tmp_path):
    """Sessions on a migrated SQLite database: for tests whose subject does not depend on the backend."""
    from core.db import make_engine, session_factory, upgrade

    url = f"sqlite:///{tmp_path / 'var' / 'tunegate.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()
