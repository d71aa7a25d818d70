"""What every command shares: the console, the `--config`/`--json` options, one way to fail and to print.

Every failure a person can fix is one line and exit code 2 (bad settings, bad input) or 1 (the work
itself failed), never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from core.settings import Settings, SettingsError, load_settings

console = Console(stderr=True)
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Settings file (default: ./tunegate.yaml or $TUNEGATE_CONFIG)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def emit(result: dict | list, json_out: bool) -> None:
    """A command's result: one JSON object on stdout with `--json`, else pretty JSON for a person."""
    if json_out:
        typer.echo(json.dumps(result))
    else:
        Console().print_json(json.dumps(result))


def settings_or_exit(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except SettingsError as err:
        raise fail(str(err)) from None


def with_session(settings: Settings):
    """A session on the configured database, migrated to the latest schema first."""
    from core.db import make_engine, session_factory, session_scope, upgrade

    upgrade(settings.database_url)
    return session_scope(session_factory(make_engine(settings.database_url)))
