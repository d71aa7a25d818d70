"""`tunegate db|settings|keys`: the database schema, the effective settings, API keys."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from core.settings import mask_url
from tunegate.cli.common import ConfigOption, JsonOption, console, fail, settings_or_exit, with_session

db_app = typer.Typer(no_args_is_help=True, help="The database schema (Alembic migrations).")
settings_app = typer.Typer(no_args_is_help=True, help="Inspect the effective settings.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys (only their hashes are stored).")


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None, revision: str = "head") -> None:
    """Create or migrate the database to `revision` (default: the latest)."""
    from core.db import migrate

    settings = settings_or_exit(config)
    migrate.upgrade(settings.database_url, revision)
    revision = migrate.current(settings.database_url)
    console.print(f"database at [bold]{mask_url(settings.database_url)}[/] is at revision {revision}")


@db_app.command("downgrade")
def db_downgrade(
    revision: str = typer.Argument(..., help="Target revision, e.g. `base` or `-1`."),
    config: ConfigOption = None,
) -> None:
    """Migrate the database down to `revision`."""
    from core.db import migrate

    settings = settings_or_exit(config)
    migrate.downgrade(settings.database_url, revision)
    console.print(f"database is at {migrate.current(settings.database_url) or 'base (empty)'}")


@db_app.command("current")
def db_current(config: ConfigOption = None) -> None:
    """Print the database's revision and the latest one."""
    from core.db import migrate

    settings = settings_or_exit(config)
    typer.echo(json.dumps({"current": migrate.current(settings.database_url), "head": migrate.head()}))


@settings_app.command("show")
def settings_show(config: ConfigOption = None) -> None:
    """Print the effective settings as JSON (secrets masked: keys as `***`, URLs without passwords)."""
    typer.echo(json.dumps(settings_or_exit(config).redacted(), indent=2))


@keys_app.command("create")
def keys_create(
    name: str,
    role: Annotated[str, typer.Option(help="app, reviewer or admin.")] = "app",
    rpm: Annotated[int | None, typer.Option(help="Requests per minute (default: the gateway's).")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute (default: the gateway's).")] = None,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Mint an API key; it is printed once and only its hash is stored."""
    from core.keys import create_key

    settings = settings_or_exit(config)
    try:
        with with_session(settings) as session:
            key, row = create_key(session, name, role, rpm, tpm)
            info = {"key": key, "name": row.name, "role": row.role, "prefix": row.key_prefix}
    except ValueError as err:
        raise fail(str(err)) from None
    if json_out:
        typer.echo(json.dumps(info))
    else:
        console.print(f"created {info['role']} key [bold]{name}[/]; store it now, it is not shown again:")
        typer.echo(key)


@keys_app.command("list")
def keys_list(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """List keys (name, prefix, role, limits, state); never the keys themselves."""
    from core.keys import list_keys

    with with_session(settings_or_exit(config)) as session:
        rows = [
            {
                "name": k.name,
                "prefix": k.key_prefix,
                "role": k.role,
                "rpm": k.requests_per_minute,
                "tpm": k.tokens_per_minute,
                "created_at": k.created_at.isoformat(),
                "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
            }
            for k in list_keys(session)
        ]
    if json_out:
        typer.echo(json.dumps(rows))
        return
    table = Table("name", "prefix", "role", "rpm", "tpm", "created", "state")
    for r in rows:
        table.add_row(
            r["name"],
            r["prefix"],
            r["role"],
            str(r["rpm"] or "-"),
            str(r["tpm"] or "-"),
            r["created_at"],
            "[red]revoked[/]" if r["revoked_at"] else "active",
        )
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(name_or_prefix: str, config: ConfigOption = None) -> None:
    """Revoke the keys with this name or prefix (takes effect within `gateway.key_cache_s`)."""
    from core.keys import revoke

    with with_session(settings_or_exit(config)) as session:
        count = revoke(session, name_or_prefix)
    if not count:
        raise fail(f"no active key named or prefixed `{name_or_prefix}`", code=1)
    console.print(f"revoked {count} key(s)")
