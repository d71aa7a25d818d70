"""Alembic environment for tunegate's schema (the models in `core.db.models`).

The database comes from, in order: a connection handed over in `config.attributes["connection"]`
(the caller owns its transaction and commits it), the `sqlalchemy.url` option
(`core.db.migrate.alembic_config` sets it), or tunegate's settings, so that
`alembic -c core/migrations/alembic.ini upgrade head` migrates the configured database.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from core.db.models import Base
from core.db.session import make_engine

config = context.config
if config.config_file_name:
    # Only the command line has a file; programs calling core.db.migrate keep their own logging.
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata


def database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from core.settings import get_settings

    return get_settings().database_url


def run_migrations(connection: Connection) -> None:
    is_sqlite = connection.dialect.name == "sqlite"
    if is_sqlite:
        # Batch operations rebuild a table by copying it and dropping the original; with foreign keys
        # enforced, that drop would cascade-delete the rows that reference it. The connection stays
        # this way, so whoever opened it discards it afterwards rather than reusing it (`main` does).
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode rewrites the table instead.
        render_as_batch=is_sqlite,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    if is_sqlite:
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RuntimeError(f"migration left rows with dangling foreign keys: {broken[:10]}")


def main() -> None:
    if context.is_offline_mode():
        url = database_url()
        context.configure(
            url=url,
            target_metadata=target_metadata,
            literal_binds=True,
            render_as_batch=url.startswith("sqlite"),
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    engine = make_engine(database_url())
    try:
        # One transaction for the whole upgrade: on PostgreSQL a failed step leaves nothing behind.
        with engine.begin() as connection:
            run_migrations(connection)
    finally:
        engine.dispose()


main()
