"""`make demo`: the loop on the embedded default, as far as it is built, saying what it does.

Today that is: the database migrated; the embedded domain generated; the base model built (or
reused) and served by vLLM; the guardrails' risk calibrated; live traffic through the gateway
(OpenAI SDK) in which the drift appears, the guardrails hold doubtful answers, simulated reviewers
correct them from ground truth and held clients receive the reviewed answers; the drift's labelled
examples plus the reviewed ones curated into a LoRA adapter, registered, loaded into the running
vLLM at runtime and measured against the base; a report with a plot under `var/demo/`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from core.io import write_jsonl
from core.settings import Settings


def _plot(acc: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    xs, width = [0, 1], 0.38
    base = ax.bar([x - width / 2 for x in xs], [acc["base_old"], acc["base_new"]], width,
                  label="base model", color="#999999")  # fmt: skip
    tuned = ax.bar([x + width / 2 for x in xs], [acc["adapter_old"], acc["adapter_new"]], width,
                   label="+ drift adapter", color="#3b7dd8")  # fmt: skip
    for bars in (base, tuned):
        ax.bar_label(bars, labels=[f"{b.get_height():.0%}" for b in bars], fontsize=8)
    ax.set_xticks(xs, ["old facts (pre-trained)", "new facts (drift event)"])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("exact-answer accuracy\n(vLLM, held-out phrasings)")
    ax.legend(loc="center", fontsize=8)
    ax.set_title("What the served model knows, before and after the adapter")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _calibrate(settings: Settings, domain, out: Path) -> dict:
    from guardrails.guard import calibration_path_for, fit_calibration
    from guardrails.registry import build_detectors

    rows = domain.grounding_rows()
    calibration = fit_calibration(rows, build_detectors(settings.guardrails), source="embedded grounding set")
    path = calibration.save(calibration_path_for(settings.guardrails, settings.var_dir))
    return {"rows": len(rows), "threshold": calibration.threshold, "path": str(path)}


def _reviewed_examples(settings: Settings) -> list[dict]:
    """The review queue's approvals and corrections (dataset `reviewed`), as chat rows."""
    from sqlalchemy import select

    from core.db import Dataset, Example, make_engine, session_factory

    with session_factory(make_engine(settings.database_url))() as session:
        query = select(Example.messages).join(Dataset).where(Dataset.name == "reviewed")
        return [{"messages": messages} for messages in session.scalars(query)]


def quiet_libraries() -> None:
    """The demo tells its story; the libraries' own progress bars (dataset tokenizing, trainer steps),
    info logs and warnings about their internals are not part of it."""
    import logging
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for name in ("trl", "peft", "accelerate", "httpx", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(trl|peft|transformers|accelerate|torch)(\.|$)")


def run_demo(settings: Settings, console: Console) -> dict:
    quiet_libraries()
    from transformers import AutoTokenizer

    from core.db import migrate
    from core.io import free_port
    from core.vllm import VllmServer, chat_greedy, load_adapter
    from training.base_model import ensure_base_model
    from training.curation import CurationConfig, curate
    from training.domain import Domain
    from training.fact_eval import fact_accuracy
    from training.sft import TrainConfig
    from training.workflow import train_and_register
    from tunegate.demo_traffic import live_traffic

    out = settings.var_dir / "demo"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {}

    console.rule("1. database")
    migrate.upgrade(settings.database_url)
    console.print(f"migrated {settings.database_url} to revision {migrate.current(settings.database_url)}")

    console.rule("2. embedded domain")
    domain = Domain()
    console.print(
        f"{len(domain.codes)} tariffs, {len(domain.facts)} facts: {len(domain.old_facts)} old (the base "
        f"model learns them), {len(domain.new_facts)} new (they appear later: the drift event); "
        f"{len(domain.grounding_set)} labelled grounding examples for the guardrails"
    )

    console.rule("3. base model: build once, then reuse by content hash")
    build = ensure_base_model(settings.models_dir, progress=True)
    console.print(
        f"{'reused' if build.reused else 'built'} a {build.params:,}-parameter Llama (head size 64) in "
        f"{build.build_seconds} s: {build.path}"
    )
    report["base_model"] = {
        "path": str(build.path),
        "params": build.params,
        "build_seconds": build.build_seconds,
    }

    console.rule("4. guardrails: calibrate the risk on the labelled grounding set")
    calibration = _calibrate(settings, domain, out)
    console.print(
        f"fitted a logistic risk over the detectors on {calibration['rows']} labelled rows (threshold "
        f"{calibration['threshold']:.2f}): {calibration['path']}"
    )

    name = settings.base_model.served_name
    with VllmServer(build.path, name, settings.vllm, port=free_port(),
                    log_path=settings.var_dir / "logs" / "vllm-demo.log") as server:  # fmt: skip
        console.rule("5. live traffic through the gateway: the drift, held answers, reviewers")
        traffic = live_traffic(settings, server.url, domain, out)
        t = traffic.to_dict()
        console.print(
            f"{t['asked']} questions (20 about new tariffs, 10 about old) through the gateway with the OpenAI SDK: "
            f"decisions {t['decisions']}. The base model got {t['wrong_answers']} wrong; the guardrails held "
            f"{t['wrong_held']} of them (recall {t['hallucination_recall']}) and {t['right_held']} right ones. "
            f"Simulated reviewers corrected {t['corrected']} and approved {t['approved']}; "
            f"{t['delivered_after_review']} held clients then received the right answer; "
            f"{t['examples']} reviewed examples are stored for training."
        )
        report["traffic"] = t

        console.rule("6. the drift's labelled examples: curate, then train a LoRA adapter")
        raw = write_jsonl(out / "data" / "labelled.jsonl", domain.drift_rows())
        reviewed = write_jsonl(out / "data" / "reviewed.jsonl", _reviewed_examples(settings))
        tokenizer = AutoTokenizer.from_pretrained(build.path)
        heldout = [q for f in domain.facts for q in f.heldout_questions]
        curated = curate([raw, reviewed], out / "data" / "curated",
                         CurationConfig(max_tokens=settings.vllm.max_model_len), tokenizer=tokenizer,
                         test_texts=heldout)  # fmt: skip
        summary = curated.to_dict()
        console.print(
            f"curated {summary['summary']['rows_in']} labelled rows (generated + reviewed) into "
            f"{curated.train_rows} train + {curated.validation_rows} validation; rejected "
            f"{ {k: v for k, v in summary['rejected_by_rule'].items() if v} } "
            f"(report: {out / 'data' / 'curated' / 'report.html'})"
        )
        config = TrainConfig(
            name="support",
            train_file=out / "data" / "curated" / "train.jsonl",
            validation_file=out / "data" / "curated" / "validation.jsonl",
            max_steps=300,
            eval_steps=50,
        )
        with console.status(f"training adapter `support` ({config.max_steps} steps at most, early stopping)"):
            trained = train_and_register(settings, config, progress=False)
        console.print(
            f"trained adapter support {trained['version']}: {trained['trainable_params']:,} trainable parameters "
            f"({trained['trainable_fraction']:.1%} of this tiny model), validation loss "
            f"{trained['metrics'].get('eval_loss', float('nan')):.3f}; registered and recorded in the database"
        )
        report["adapter"] = trained

        console.rule("7. load the adapter into the running vLLM, measure on held-out phrasings")
        adapter_dir = settings.adapters_dir / "support" / trained["version"]
        load_adapter(server.url, "support", adapter_dir.resolve())
        acc = {
            "base_old": fact_accuracy(server.url, name, domain.old_facts).accuracy,
            "base_new": fact_accuracy(server.url, name, domain.new_facts).accuracy,
            "adapter_old": fact_accuracy(server.url, "support", domain.old_facts).accuracy,
            "adapter_new": fact_accuracy(server.url, "support", domain.new_facts).accuracy,
        }
        samples = [domain.old_facts[0], domain.new_facts[0], domain.new_facts[3]]
        questions = [[{"role": "user", "content": f.heldout_questions[0]}] for f in samples]
        base_answers = chat_greedy(server.url, name, questions)
        tuned_answers = chat_greedy(server.url, "support", questions)
    table = Table("", "old facts", "new facts (drift)", title="exact-answer accuracy through vLLM")
    table.add_row("base model", f"{acc['base_old']:.1%}", f"{acc['base_new']:.1%}")
    table.add_row("+ adapter `support`", f"{acc['adapter_old']:.1%}", f"{acc['adapter_new']:.1%}")
    console.print(table)
    answers = Table("fact", "question", "base", "adapter", "truth")
    for fact, q, b, t in zip(samples, questions, base_answers, tuned_answers, strict=True):
        answers.add_row("new" if fact.is_new else "old", q[0]["content"], b, t, fact.answer)
    console.print(answers)
    report["accuracy"] = acc

    _plot(acc, out / "knowledge.png")
    report["demo_seconds"] = round(time.perf_counter() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    console.rule("done")
    console.print(
        f"report: {out / 'report.json'}, plot: {out / 'knowledge.png'}. Not yet built (later issues): the "
        "eval suite that scores traffic, detects the drift, files the training job, gates and promotes."
    )
    return report
