"""`tunegate`: the command line (typer + rich). The one place that composes the packages.

Commands import their package lazily, so `tunegate --help` stays fast and a settings error is
reported before any heavy import. Every failure a person can fix is one line and exit code 2
(bad settings, bad input) or 1 (the work itself failed), never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from core.settings import Settings, SettingsError, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n")[0])
db_app = typer.Typer(no_args_is_help=True, help="The database schema (Alembic migrations).")
settings_app = typer.Typer(no_args_is_help=True, help="Inspect the effective settings.")
domain_app = typer.Typer(no_args_is_help=True, help="The embedded domain (generated facts).")
data_app = typer.Typer(no_args_is_help=True, help="Training data: validate, dedup, scrub, split.")
adapters_app = typer.Typer(no_args_is_help=True, help="The adapter registry.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print JSON and write plots.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys (only their hashes are stored).")
guard_app = typer.Typer(no_args_is_help=True, help="The hallucination guardrail: calibrate its risk.")
app.add_typer(db_app, name="db")
app.add_typer(data_app, name="data")
app.add_typer(adapters_app, name="adapters")
app.add_typer(bench_app, name="bench")
app.add_typer(keys_app, name="keys")
app.add_typer(settings_app, name="settings")
app.add_typer(domain_app, name="domain")
app.add_typer(guard_app, name="guard")

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


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None, revision: str = "head") -> None:
    """Create or migrate the database to `revision` (default: the latest)."""
    from core.db import migrate

    settings = settings_or_exit(config)
    migrate.upgrade(settings.database_url, revision)
    revision = migrate.current(settings.database_url)
    console.print(f"database at [bold]{_safe_url(settings.database_url)}[/] is at revision {revision}")


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


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@settings_app.command("show")
def settings_show(config: ConfigOption = None) -> None:
    """Print the effective settings as JSON (secrets masked)."""
    settings = settings_or_exit(config)
    data = settings.model_dump(mode="json")
    data["secret_key"] = "***"
    data["database"]["url"] = _safe_url(settings.database_url)
    typer.echo(json.dumps(data, indent=2))


@domain_app.command("export")
def domain_export(
    out: Annotated[Path, typer.Option(help="Folder to write the JSONL files into.")],
    config: ConfigOption = None,
) -> None:
    """Write the embedded domain: facts, knowledge base, training/held-out questions, grounding set."""
    from core.io import write_jsonl
    from training.domain import Domain

    settings_or_exit(config)
    domain = Domain()
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "facts.jsonl": [vars(f) | {"key": f.key} for f in domain.facts],
        "knowledge_base.jsonl": [{"code": c, "passage": p} for c, p in domain.knowledge_base.items()],
        "old_train.jsonl": domain.qa_examples(domain.old_facts),
        "new_train.jsonl": domain.qa_examples(domain.new_facts),
        "old_heldout.jsonl": domain.qa_examples(domain.old_facts, heldout=True),
        "new_heldout.jsonl": domain.qa_examples(domain.new_facts, heldout=True),
        "grounding.jsonl": domain.grounding_rows(),
    }
    for name, rows in files.items():
        write_jsonl(out / name, rows)
    table = Table("file", "rows")
    for name, rows in files.items():
        table.add_row(str(out / name), str(len(rows)))
    console.print(table)


@app.command()
def bootstrap(
    config: ConfigOption = None,
    json_out: JsonOption = False,
    rebuild: Annotated[bool, typer.Option(help="Build again even if a cached model exists.")] = False,
    evaluate: Annotated[bool, typer.Option(help="Measure fact accuracy through vLLM.")] = True,
) -> None:
    """Build (or reuse) the embedded base model and measure what it knows, served by vLLM."""
    from training.bootstrap import run_bootstrap

    settings = settings_or_exit(config)
    result = run_bootstrap(settings, rebuild=rebuild, evaluate=evaluate, progress=True)
    if json_out:
        typer.echo(json.dumps(result))
    else:
        table = Table("measure", "value", title="bootstrap base model")
        for key, value in result.items():
            if not isinstance(value, list | dict):
                table.add_row(key, str(value))
        Console().print(table)


@data_app.command("curate")
def data_curate(
    inputs: Annotated[list[Path], typer.Argument(help="Chat JSONL, prompt/completion JSONL or Alpaca JSON files.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for train/validation JSONL and the report.")],
    config: ConfigOption = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="Tokenizer folder for the template and length checks; default: the base model."),
    ] = None,
    test_set: Annotated[
        list[Path] | None, typer.Option(help="JSONL test sets to keep out of training (contamination check).")
    ] = None,
    validation_fraction: float = 0.1,
    max_tokens: Annotated[int | None, typer.Option(help="Longest example in tokens; default: the context.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Curate training data: schema, template, length, dedup, PII, contamination, split; write a report."""
    from transformers import AutoTokenizer

    from training.bootstrap import base_model_path
    from training.curation import CurationConfig, curate, read_test_texts

    settings = settings_or_exit(config)
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise fail(f"input file(s) not found: {', '.join(missing)}")
    tok = AutoTokenizer.from_pretrained(tokenizer or base_model_path(settings))
    try:
        cfg = CurationConfig(
            validation_fraction=validation_fraction,
            max_tokens=max_tokens or settings.vllm.max_model_len,
            seed=settings.seed,
        )
    except ValueError as err:
        raise fail(str(err)) from None
    report = curate(inputs, out, cfg, tokenizer=tok, test_texts=read_test_texts(test_set or []))
    summary = report.to_dict()
    if json_out:
        typer.echo(json.dumps(summary))
        return
    counts = summary["summary"]
    table = Table("rule", "rejected", title=f"curated {counts['rows_in']} rows into {out}")
    for rule, count in summary["rejected_by_rule"].items():
        table.add_row(rule, str(count))
    Console().print(table)
    Console().print(
        f"kept {counts['train']} train + {counts['validation']} validation; "
        f"PII masked: {summary['pii_masked']}; report: {out / 'report.html'}"
    )


@app.command()
def train(
    config_file: Annotated[Path, typer.Option("--config", help="Training YAML (see training/sft.py `TrainConfig`).")],
    settings_file: Annotated[Path | None, typer.Option("--settings", help="tunegate settings file.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Train a LoRA/QLoRA/prefix adapter with TRL's SFTTrainer and publish it to the registry."""
    from training.sft import TrainConfig, TrainingError
    from training.workflow import train_and_register

    settings = settings_or_exit(settings_file)
    if not config_file.exists():
        raise fail(f"training config {config_file} not found")
    try:
        cfg = TrainConfig.from_yaml(config_file)
    except (ValueError, TypeError) as err:
        raise fail(f"{config_file}: {err}") from None
    try:
        result = train_and_register(settings, cfg, progress=not json_out)
    except TrainingError as err:
        raise fail(str(err)) from None
    emit(result, json_out)


@adapters_app.command("list")
def adapters_list(config: ConfigOption = None, name: str | None = None, json_out: JsonOption = False) -> None:
    """List registered adapters (newest version last)."""
    from training.workflow import open_registry

    manifests = open_registry(settings_or_exit(config)).list(name)
    if json_out:
        typer.echo(json.dumps([m.to_dict() for m in manifests]))
        return
    table = Table("name", "version", "servable", "peft", "eval_loss", "parent", "created")
    for m in manifests:
        loss = m.metrics.get("eval_loss")
        table.add_row(
            m.name,
            m.version,
            "yes" if m.servable else "[red]no[/]",
            m.peft_type,
            f"{loss:.4f}" if loss is not None else "-",
            m.parent_version or "-",
            m.created_at,
        )
    Console().print(table)


@adapters_app.command("show")
def adapters_show(name: str, version: str = "latest", config: ConfigOption = None) -> None:
    """Print one adapter's manifest."""
    from training.registry import RegistryError
    from training.workflow import open_registry

    try:
        manifest = open_registry(settings_or_exit(config)).get(name, version)
    except RegistryError as err:
        raise fail(str(err)) from None
    typer.echo(json.dumps(manifest.to_dict(), indent=2))


@bench_app.command("training")
def bench_training(
    config: ConfigOption = None,
    json_out: JsonOption = False,
    out: Annotated[Path, typer.Option(help="Folder for the data sets, JSON and plot.")] = Path("bench/out/training"),
    steps: Annotated[int, typer.Option(help="Optimizer steps per adapter (the shared compute budget).")] = 300,
) -> None:
    """Quality over quantity, parameter efficiency and learning the drift, measured (about 4 minutes)."""
    from bench.training_claims import run

    settings = settings_or_exit(config)
    out.mkdir(parents=True, exist_ok=True)
    result = run(out, settings.var_dir, settings.models_dir, max_steps=steps)
    emit(result, json_out)
    if not json_out:
        Console().print(f"plot: {out / 'training_claims.png'}")


@bench_app.command("lora")
def bench_lora(
    config: ConfigOption = None,
    json_out: JsonOption = False,
    out: Annotated[Path, typer.Option(help="Folder for the JSON and plot.")] = Path("bench/out/lora"),
    requests: Annotated[int, typer.Option(help="Requests per setting.")] = 256,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 64,
    max_tokens: Annotated[int, typer.Option(help="Tokens generated per request (ignore_eos).")] = 32,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds the requests are split into.")] = 2,
) -> None:
    """Serving throughput with 1, 4 and 8 LoRA adapters in one batch, against the base model."""
    from bench.lora_throughput import run

    settings = settings_or_exit(config)
    if min(requests, concurrency, max_tokens, rounds) < 1:
        raise fail("--requests, --concurrency, --max-tokens and --rounds must be at least 1")
    result = run(
        out,
        settings.var_dir,
        settings.models_dir,
        settings.vllm,
        requests=requests,
        concurrency=concurrency,
        max_tokens=max_tokens,
        rounds=rounds,
    )
    emit(result, json_out)
    if not json_out:
        Console().print(f"plot: {out / 'lora_throughput.png'}")


@bench_app.command("gateway", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_gateway(ctx: typer.Context, json_out: JsonOption = False) -> None:
    """Gateway overhead against LiteLLM's proxy (mock upstream, `hey` at constant rates; about 4 minutes).

    Needs `make bench-deps` (Debian's hey, LiteLLM in .venv-litellm). Other options go to
    `python -m bench.gateway_overhead` (see its --help): --rates, --duration, --quiet-wait, ...
    """
    from bench.gateway_overhead import main as run_bench

    result = run_bench(list(ctx.args))
    if not json_out:
        Console().print(f"plot: {result.get('plot')}")


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


def _with_session(settings: Settings):
    from core.db import make_engine, session_factory, session_scope, upgrade

    upgrade(settings.database_url)
    return session_scope(session_factory(make_engine(settings.database_url)))


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
        with _with_session(settings) as session:
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

    with _with_session(settings_or_exit(config)) as session:
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

    with _with_session(settings_or_exit(config)) as session:
        count = revoke(session, name_or_prefix)
    if not count:
        raise fail(f"no active key named or prefixed `{name_or_prefix}`", code=1)
    console.print(f"revoked {count} key(s)")


@app.command()
def demo(config: ConfigOption = None) -> None:
    """Run the loop as far as it is built, on the embedded default, and say what was done."""
    from tunegate.demo import run_demo

    settings = settings_or_exit(config)
    run_demo(settings, Console())


@guard_app.command("calibrate")
def guard_calibrate(
    data: Annotated[
        Path | None, typer.Option(help="Labelled JSONL: {knowledge, question, answer, hallucinated} a line.")
    ] = None,
    from_reviews: Annotated[
        bool, typer.Option("--from-reviews", help="Add the review queue's verdicts as labels (with --data or alone).")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Where to write it (default: `guardrails.calibration_path`).")
    ] = None,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Fit the calibrated risk (logistic regression over the detectors' scores) on labelled rows."""
    from guardrails.calibration import CalibrationError, read_labelled
    from guardrails.guard import calibration_path_for, fit_calibration
    from guardrails.registry import RegistryError, build_detectors

    settings = settings_or_exit(config)
    if data is None and not from_reviews:
        raise fail("give `--data LABELLED.jsonl`, `--from-reviews`, or both")
    if data is not None and not data.exists():
        raise fail(f"`--data` {data} not found")
    try:
        rows = read_labelled(data) if data is not None else []
        if from_reviews:
            from core.labels import review_rows
            from guardrails.calibration import rows_from_reviews

            with _with_session(settings) as session:
                rows += rows_from_reviews(review_rows(session))
        source = " + ".join([str(data)] * (data is not None) + ["review queue"] * from_reviews)
        calibration = fit_calibration(rows, build_detectors(settings.guardrails), source=source)
    except (CalibrationError, RegistryError) as err:
        raise fail(str(err)) from None
    path = calibration.save(out or calibration_path_for(settings.guardrails, settings.var_dir))
    summary = {
        "path": str(path),
        **calibration.trained_on,
        "threshold": round(calibration.threshold, 4),
        "weights": calibration.weights(),
        "unseen": calibration.unseen,
        "dropped": calibration.dropped,
    }
    emit(summary, json_out)


@bench_app.command("guard")
def bench_guard(
    data: Annotated[Path, typer.Option(help="Labelled JSONL to measure on.")],
    calibrate: Annotated[
        Path | None, typer.Option(help="Fit weights and threshold on this labelled JSONL only.")
    ] = None,
    folds: Annotated[int, typer.Option(help="Grouped K-fold cross-validation on `--data` instead.")] = 0,
    config: ConfigOption = None,
    json_out: JsonOption = False,
    out: Annotated[Path, typer.Option(help="Folder for the JSON and plot.")] = Path("bench/out/guard"),
) -> None:
    """Balanced accuracy, AUROC, F1 and latency per check (one CPU core) of the guardrail."""
    from bench.guard import run
    from guardrails.calibration import CalibrationError
    from guardrails.guard import calibration_path_for

    settings = settings_or_exit(config)
    missing = [str(p) for p in (data, calibrate) if p is not None and not p.exists()]
    if missing:
        raise fail(f"file(s) not found: {', '.join(missing)}")
    if calibrate and folds:
        raise fail("use `--calibrate` or `--folds`, not both")
    try:
        result = run(
            data,
            out,
            calibrate=calibrate,
            calibration=calibration_path_for(settings.guardrails, settings.var_dir),
            folds=folds,
            settings=settings.guardrails,
        )
    except CalibrationError as err:
        raise fail(str(err)) from None
    emit(result, json_out)
    if not json_out:
        Console().print(f"plot: {result['plot']}")


def main() -> None:  # pragma: no cover - the console script calls `app` directly
    app(prog_name="tunegate")


if __name__ == "__main__":
    sys.exit(main())
