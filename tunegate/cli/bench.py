"""`tunegate bench ...`: the benchmarks, each printing one JSON object and writing plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tunegate.cli.common import ConfigOption, JsonOption, emit, fail, settings_or_exit

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print JSON and write plots.")


def _report(result: dict, json_out: bool, plot: object) -> None:
    """The result (see `emit`), and for a person the plot's path after it."""
    emit(result, json_out)
    if not json_out:
        Console().print(f"plot: {plot}")


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
    _report(result, json_out, out / "training_claims.png")


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
    _report(result, json_out, out / "lora_throughput.png")


@bench_app.command("gateway", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_gateway(ctx: typer.Context, json_out: JsonOption = False) -> None:
    """Gateway overhead against LiteLLM's proxy (mock upstream, `hey` at constant rates; about 4 minutes).

    Needs `make bench-deps` (Debian's hey, LiteLLM in .venv-litellm). Other options are the fields of
    `bench.gateway_config.GatewayBenchConfig`, as `python -m bench.gateway_overhead --help` lists them:
    --rates, --duration, --hey-procs, --quiet-wait, ...
    """
    from bench.gateway_overhead import main as run_bench

    try:
        result = run_bench(list(ctx.args))
    except RuntimeError as err:  # no `hey`, or the mock upstream never answered: one line, no traceback
        raise fail(str(err), code=1) from None
    if not json_out:
        Console().print(f"plot: {result.get('plot')}")


@bench_app.command("guard")
def bench_guard(
    data: Annotated[list[Path], typer.Option(help="Labelled JSONL to measure on (repeatable: one result each).")],
    calibrate: Annotated[
        Path | None, typer.Option(help="Fit weights and threshold on this labelled JSONL only.")
    ] = None,
    folds: Annotated[int, typer.Option(help="Grouped K-fold cross-validation within each `--data` instead.")] = 0,
    config: ConfigOption = None,
    json_out: JsonOption = False,
    out: Annotated[Path, typer.Option(help="Folder for the JSON and plot.")] = Path("bench/out/guard"),
) -> None:
    """Balanced accuracy, AUROC, F1 and latency per check (one CPU core) of the guardrail."""
    from bench.guard import run
    from guardrails.calibration import CalibrationError
    from guardrails.guard import calibration_path_for

    settings = settings_or_exit(config)
    missing = [str(p) for p in (*data, calibrate) if p is not None and not p.exists()]
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
    _report(result, json_out, result["plot"])


@bench_app.command("guard-allowance")
def bench_guard_allowance(
    data_dir: Annotated[Path, typer.Option(help="The shared data folder (its training folders are read).")] = Path(
        "../shared/data"
    ),
    json_out: JsonOption = False,
    out: Annotated[Path, typer.Option(help="Folder for the JSON and plot.")] = Path("bench/out/guard"),
) -> None:
    """How much of a faithful answer its context lacks (the grounding detector's paraphrase allowance)."""
    from bench.guard_allowance import run
    from guardrails.calibration import CalibrationError

    try:
        result = run(data_dir, out)
    except (FileNotFoundError, CalibrationError) as err:
        raise fail(str(err)) from None
    _report(result, json_out, result["plot"])


@bench_app.command("guard-learning")
def bench_guard_learning(
    data: Annotated[Path, typer.Option(help="Labelled JSONL, split by context: evaluation and reviewed pool.")] = Path(
        "../shared/data/ragtruth-qa-dev/ragtruth_qa_dev.jsonl"
    ),
    calibrate: Annotated[Path, typer.Option(help="The cold start's calibration data.")] = Path(
        "../shared/data/halueval-qa-dev/halueval_qa_dev.jsonl"
    ),
    draws: Annotated[int, typer.Option(help="Random draws of reviewed items per size.")] = 3,
    config: ConfigOption = None,
    json_out: JsonOption = False,
    out: Annotated[Path, typer.Option(help="Folder for the JSON and plot.")] = Path("bench/out/guard"),
) -> None:
    """The guard's learning curve: balanced accuracy against reviewed items (re-fit and fine-tune)."""
    from bench.guard_learning import run
    from guardrails.calibration import CalibrationError

    settings = settings_or_exit(config)
    missing = [str(p) for p in (data, calibrate) if not p.exists()]
    if missing:
        raise fail(f"file(s) not found: {', '.join(missing)}")
    if draws < 1:
        raise fail("`--draws` must be at least 1")
    try:
        result = run(data, calibrate, out, settings=settings.guardrails, draws=draws)
    except CalibrationError as err:
        raise fail(str(err)) from None
    _report(result, json_out, result["plot"])


@bench_app.command("reliability")
def bench_reliability(
    json_out: JsonOption = False,
    out: Annotated[Path, typer.Option(help="Folder for the JSON and plot.")] = Path("bench/out/reliability"),
    soak_minutes: Annotated[float, typer.Option(help="Minutes of steady load (10 for the full soak).")] = 0.25,
    soak_rate: Annotated[float, typer.Option(help="Requests per second during the soak.")] = 10.0,
    outage_s: Annotated[float, typer.Option(help="Seconds PostgreSQL is unreachable (30 for the full run).")] = 5.0,
    no_postgres: Annotated[bool, typer.Option("--no-postgres", help="Skip the database outage.")] = False,
) -> None:
    """Hostile requests, authorization probes, injected faults and a soak through the gateway (mock vLLM)."""
    from bench.reliability import run

    if soak_minutes <= 0 or soak_rate <= 0 or outage_s < 0:
        raise fail("--soak-minutes and --soak-rate must be positive, --outage-s not negative")
    result = run(out, soak_minutes, soak_rate, outage_s, postgres=not no_postgres)
    _report({k: v for k, v in result.items() if k != "fault_details"}, json_out, result["plot"])
