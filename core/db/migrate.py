"""Schema migrations from code: upgrade, downgrade and inspect a database with the Alembic scripts
in `core/migrations`, found next to this package so any working directory (or an installed
wheel) works without an alembic.ini.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from core.db.models import Base
from core.db.session import make_engine

MIGRATIONS_DIR = Path(str(files("core") / "migrations"))


def alembic_config(url: str | None = None) -> Config:
    """An Alembic `Config` for tunegate's migrations, pointed at `url` when given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        # Config values go through ConfigParser interpolation, where a bare % (as in a URL-escaped
        # password) is an error.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database is at; None for a database that was never migrated."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head() -> str:
    """The newest revision in `core/migrations/versions`."""
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if revision is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR / 'versions'}")
    return revision


def check_schema_matches_models(url: str) -> list[Any]:
    """Differences between the database at `url` and `core.db.models`; empty when they agree.

    Each entry is an Alembic autogenerate diff, e.g. ("add_column", None, "jobs", Column(...)).
    """
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True}
            )
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
