"""`make demo`: the loop on the embedded default, as far as it is built, saying what it does.

Today that is: the database migrated, the embedded domain generated, the base model built
(or reused) and served by vLLM, its knowledge measured on old facts and on the new facts of
the drift event, a few live answers shown, and a report with a plot under `var/demo/`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunegate.settings import Settings


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    labels = ["old facts\n(trained on)", "new facts\n(drift event)"]
    values = [result["old_fact_accuracy"], result["new_fact_accuracy"]]
    bars = ax.bar(labels, values, color=["#3b7dd8", "#d8823b"])
    ax.bar_label(bars, labels=[f"{v:.0%}" for v in values])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact-answer accuracy (vLLM, held-out phrasings)")
    ax.set_title("What the base model knows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(settings: Settings, console: Console) -> dict:
    from training.bootstrap import run_bootstrap
    from training.domain import Domain
    from tunegate.db import migrate
    from tunegate.vllm import VllmServer, chat_greedy, free_port

    out = settings.var_dir / "demo"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    console.rule("1. database")
    migrate.upgrade(settings.database_url)
    console.print(f"migrated {settings.database_url} to revision {migrate.current(settings.database_url)}")

    console.rule("2. embedded domain")
    domain = Domain()
    console.print(
        f"{len(domain.codes)} tariffs, {len(domain.facts)} facts: {len(domain.old_facts)} old (the base "
        f"model learns them), {len(domain.new_facts)} new (appear later: the drift event); "
        f"{len(domain.grounding_set)} labelled grounding examples for the guardrails"
    )

    console.rule("3. base model: build or reuse, then measure through vLLM")
    result = run_bootstrap(settings, progress=True)
    console.print(
        f"{'reused' if result['reused'] else 'built'} {result['params']:,}-parameter Llama in "
        f"{result['build_seconds']} s at {result['model_path']}"
    )
    console.print(
        f"old-fact accuracy {result['old_fact_accuracy']:.1%} on {result['old_questions']} held-out "
        f"questions, new-fact accuracy {result['new_fact_accuracy']:.1%} on {result['new_questions']}"
    )

    console.rule("4. live answers from vLLM (the drift: new tariffs are unknown)")
    samples = [domain.old_facts[0], domain.old_facts[7], domain.new_facts[0], domain.new_facts[3]]
    name = settings.base_model.served_name
    with VllmServer(
        Path(result["model_path"]),
        name,
        settings.vllm,
        port=free_port(),
        log_path=settings.var_dir / "logs" / "vllm-demo.log",
    ) as server:
        questions = [f.heldout_questions[0] for f in samples]
        answers = chat_greedy(server.url, name, [[{"role": "user", "content": q}] for q in questions])
    table = Table("fact", "question", "model's answer", "truth", "")
    for fact, question, answer in zip(samples, questions, answers, strict=True):
        ok = answer.strip() == fact.answer
        table.add_row(
            "new" if fact.is_new else "old",
            question,
            answer,
            fact.answer,
            "[green]right[/]" if ok else "[red]wrong[/]",
        )
    console.print(table)

    _plot(result, out / "knowledge.png")
    result["demo_seconds"] = round(time.perf_counter() - started, 1)
    (out / "report.json").write_text(json.dumps(result, indent=2))
    console.rule("done")
    console.print(
        f"report: {out / 'report.json'}, plot: {out / 'knowledge.png'}. Next in the loop (later issues): "
        "adapters trained on reviewed data, the gateway with guardrails and review, the eval suite."
    )
    return result
