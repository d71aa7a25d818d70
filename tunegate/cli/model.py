"""`tunegate domain|bootstrap|data|train|adapters`: the embedded domain, the base model, data curation,
training and the adapter registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tunegate.cli.common import ConfigOption, JsonOption, console, emit, fail, settings_or_exit

domain_app = typer.Typer(no_args_is_help=True, help="The embedded domain (generated facts).")
data_app = typer.Typer(no_args_is_help=True, help="Training data: validate, dedup, scrub, split.")
adapters_app = typer.Typer(no_args_is_help=True, help="The adapter registry.")
train_app = typer.Typer()  # `bootstrap` and `train` are top-level commands, registered on the root app


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


@train_app.command()
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


@train_app.command()
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
