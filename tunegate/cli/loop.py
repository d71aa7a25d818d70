"""`tunegate worker | loop | evals | report`: the closed loop's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunegate.cli.common import ConfigOption, JsonOption, console, emit, fail, settings_or_exit, with_session

loop_app = typer.Typer(no_args_is_help=True, help="The closed loop: status, pause, resume, one pass.")
evals_app = typer.Typer(no_args_is_help=True, help="The routes' test sets and holdouts.")
worker_app = typer.Typer()  # `worker` and `report` are top-level commands, registered on the root app
RouteOption = Annotated[str | None, typer.Option("--route", help="One route (default: every route).")]
VllmOption = Annotated[str | None, typer.Option("--vllm-url", help="The vLLM server the gate evaluates through.")]


def _loop(config, vllm_url: str | None):
    from tunegate.loop import Loop

    settings = settings_or_exit(config)
    url = vllm_url or settings.vllm.url
    if not url:
        raise fail("the loop needs the vLLM server the gateway uses: pass --vllm-url or set `vllm.url`")
    with with_session(settings):
        pass  # migrated
    loop = Loop(settings, url)
    for route in loop.routes():
        loop.replay[route] = base_replay(settings)
    return loop


def base_replay(settings) -> list[dict]:
    """The base model's own training data, to replay beside reviewed labels: for the embedded base model,
    its pre-training set; a configured base model's is not known (add curated rows instead)."""
    if settings.base_model.path:
        return []
    from training.domain import Domain

    domain = Domain()
    return domain.qa_examples(domain.old_facts)


@worker_app.command()
def worker(
    config: ConfigOption = None,
    vllm_url: VllmOption = None,
    once: Annotated[bool, typer.Option(help="One pass, then exit.")] = False,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port.")] = None,
) -> None:
    """Run the loop: score traffic, drift, review priority, triggers, training, gate, canary (several may run)."""
    import logging

    from tunegate.loop import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    loop = _loop(config, vllm_url)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        from evalsuite.metrics import LoopMetrics

        loop.metrics = LoopMetrics()
        start_http_server(metrics_port, registry=loop.metrics.registry)
        console.print(f"worker metrics on :{metrics_port}/metrics")
    run_worker(loop, once=once)


@loop_app.command("status")
def loop_status(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Every route: its versions and weights, paused or not, the test set, running canaries, recent jobs."""
    import sqlalchemy as sa

    from core.db import Job
    from core.lifecycle import is_paused, route_table, seed_routes
    from core.vocab import DatasetKind
    from evalsuite import canary, testsets

    settings = settings_or_exit(config)
    with with_session(settings) as session:
        seed_routes(session, settings.routes)
        out = {}
        for route, targets in route_table(session).items():
            out[route] = {
                "paused": is_paused(session, route),
                "targets": [{"version": t.label, "status": t.status, "weight": t.weight} for t in targets],
                "test_set_version": testsets.current_version(session, route),
                "test_items": len(testsets.items(session, route, DatasetKind.TEST)),
                "holdout_items": len(testsets.items(session, route, DatasetKind.HOLDOUT)),
                "canary": [
                    {
                        "candidate_id": r.candidate_id,
                        "step": r.step,
                        "weights": r.weights,
                        "share": canary.canary_state(r),
                    }
                    for r in canary.running_rollouts(session)
                    if r.route == route
                ],
            }
        recent = session.scalars(sa.select(Job).order_by(Job.id.desc()).limit(10)).all()
        out["_jobs"] = [
            {"id": j.id, "kind": j.kind, "status": j.status, "route": (j.payload or {}).get("route")} for j in recent
        ]
    emit(out, json_out)


def _set_paused(config, route: str | None, paused: bool, reason: str) -> None:
    from core.lifecycle import route_table, seed_routes, set_paused

    settings = settings_or_exit(config)
    with with_session(settings) as session:
        seed_routes(session, settings.routes)
        routes = [route] if route else sorted(route_table(session))
        if route and route not in route_table(session):
            raise fail(f"no route `{route}`; `tunegate loop status` lists them")
        for name in routes:
            set_paused(session, name, paused, actor="cli", reason=reason)
    console.print(f"{'paused' if paused else 'resumed'}: {', '.join(routes) or '(no routes)'}")


@loop_app.command("pause")
def loop_pause(config: ConfigOption = None, route: RouteOption = None, reason: str = "") -> None:
    """Stop the loop from training, gating or moving traffic for a route (scoring goes on)."""
    _set_paused(config, route, True, reason)


@loop_app.command("resume")
def loop_resume(config: ConfigOption = None, route: RouteOption = None) -> None:
    """Let the loop act on a route again."""
    _set_paused(config, route, False, "")


@loop_app.command("run-once")
def loop_run_once(config: ConfigOption = None, vllm_url: VllmOption = None, json_out: JsonOption = False) -> None:
    """One pass of the loop over every route, now; prints what each step found."""
    emit(_loop(config, vllm_url).tick(force=True), json_out)


@evals_app.command("export")
def evals_export(
    route: Annotated[str, typer.Argument(help="The route whose test set to export.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the task's YAML and JSONL.")],
    config: ConfigOption = None,
    kind: Annotated[str, typer.Option(help="`test` or `holdout`.")] = "test",
    version: Annotated[int | None, typer.Option(help="Test set version (default: the newest).")] = None,
    gateway_url: Annotated[str, typer.Option(help="Where the gateway listens, for the printed command.")] = "",
    json_out: JsonOption = False,
) -> None:
    """Write a route's test set (or holdout) as an lm-evaluation-harness task that runs against the gateway."""
    from core.vocab import DatasetKind
    from evalsuite import testsets
    from evalsuite.export import export_lm_eval

    if kind not in ("test", "holdout"):
        raise fail("`--kind` is `test` or `holdout`")
    settings = settings_or_exit(config)
    with with_session(settings) as session:
        rows = [i.to_row() for i in testsets.items(session, route, DatasetKind(kind), version)]
    if not rows:
        raise fail(f"route `{route}` has no {kind} items yet (they grow from reviewed answers)")
    task = f"tunegate_{route}_{kind}".replace("-", "_")
    result = export_lm_eval(rows, out, task, description=f"tunegate route `{route}`, {kind} set")
    gw = gateway_url or f"http://{settings.gateway.host}:{settings.gateway.port}"
    emit(
        {
            "task": task,
            "rows": result.rows,
            "yaml": str(result.yaml_path),
            "jsonl": str(result.jsonl_path),
            "sha256": result.sha256,
            "metric": result.metric_key,
            "command": f"OPENAI_API_KEY=<an app key> {result.command(route, gw)}",
        },
        json_out,
    )


@worker_app.command()
def report(
    out: Annotated[Path, typer.Option("--out", help="Folder for index.html, report.json and the plots.")],
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """An HTML page with plots: quality per version over time, drift, flag and override rates, review
    throughput, the adapter timeline."""
    from evalsuite.report import write_report

    settings = settings_or_exit(config)
    with with_session(settings) as session:
        result = write_report(session, out)
    emit({"html": str(result.html_path), "plots": [str(p) for p in result.plots], **result.summary}, json_out)
