"""`tunegate`: the command line (typer + rich). The one place that composes the packages.

Commands import their package lazily, so `tunegate --help` stays fast and a settings error is
reported before any heavy import. One module per group of commands: `store` (db, settings, keys),
`model` (domain, bootstrap, data, train, adapters), `guard`, `bench`, `loop` (worker, loop,
evals, report); `serve` and `demo` are here.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from tunegate.cli.bench import bench_app
from tunegate.cli.common import ConfigOption, JsonOption, console, settings_or_exit
from tunegate.cli.guard import guard_app
from tunegate.cli.loop import evals_app, loop_app, worker_app
from tunegate.cli.model import adapters_app, data_app, domain_app, train_app
from tunegate.cli.store import db_app, keys_app, settings_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n")[0])
app.add_typer(db_app, name="db")
app.add_typer(data_app, name="data")
app.add_typer(adapters_app, name="adapters")
app.add_typer(bench_app, name="bench")
app.add_typer(keys_app, name="keys")
app.add_typer(settings_app, name="settings")
app.add_typer(domain_app, name="domain")
app.add_typer(guard_app, name="guard")
app.add_typer(loop_app, name="loop")
app.add_typer(evals_app, name="evals")
app.registered_commands += train_app.registered_commands + worker_app.registered_commands


@app.command()
def serve(
    config: ConfigOption = None,
    vllm_url: Annotated[str | None, typer.Option(help="Use this running vLLM instead of starting one.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default: `gateway.host`).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: `gateway.port`).")] = None,
    workers: Annotated[int | None, typer.Option(help="uvicorn worker processes (default: `gateway.workers`).")] = None,
    background: Annotated[
        bool, typer.Option("--workers-loop/--no-workers", help="Run the loop's background work (retention).")
    ] = True,
) -> None:
    """Start vLLM and the gateway; stop both cleanly on SIGTERM or Ctrl-C."""
    from tunegate.serve import serve as run_serve

    settings = settings_or_exit(config)
    gw = settings.gateway
    run_serve(settings, vllm_url, host or gw.host, port or gw.port, workers or gw.workers, background, config, console)


@app.command()
def demo(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Run the closed loop on the embedded default and say what was done (with --json, the story goes to
    stderr and the results to stdout as one JSON object)."""
    import json

    from tunegate.demo import run_demo

    settings = settings_or_exit(config)
    summary = run_demo(settings, Console(stderr=json_out))
    if json_out:
        print(json.dumps(summary, default=str), flush=True)
    exit_without_native_teardown(0)


def exit_without_native_teardown(code: int) -> None:
    """End the process now that its work is written and its servers are stopped.

    Triton's nanobind bindings (imported by the training stack) print hundreds of "leaked instance"
    lines during interpreter teardown; they are not leaks of ours and not part of the story, so the
    demo skips that teardown once every file is closed and the output is flushed."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
