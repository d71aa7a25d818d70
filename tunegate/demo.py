"""`make demo`: the closed loop on the embedded default, on a CPU, saying what it does.

The base model serves the route `support` through the gateway. Before the drift, traffic asks about
the old tariffs; reviewers look at a sample and at what the eval suite prioritises, and their first
verdicts become the frozen holdout. Then the drift arrives in two waves: questions about new tariffs,
in several phrasings, which the base model gets wrong; the guardrails hold them, the reviewers correct
them through the review API, and the loop (the worker's pass, `tunegate.loop.Loop.tick`) splits their
labels into test set and training labels, scores the traffic and sees the drift. A trigger fires; the
adapter trains on the reviewed labels (plus a replay of the base model's pre-training set); the gate
compares it with the base model through vLLM; the canary takes 10 %, 50 %, 100 % of the traffic and is
promoted. Then a candidate trained on corrupted labels goes the same way and must never reach 100 %.

The embedded domain's ground truth plays the reviewers (`tunegate.demo_traffic`) and scores the final
measurement (`_measure`); the loop never reads it. The demo runs in its own folder and database
(`<var_dir>/demo/run`, fresh each time); the base model is shared with the rest of tunegate.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from core.io import write_jsonl
from core.settings import Settings

ROUTE = "support"
N_REVIEWED_FACTS = 50  # new facts whose questions reach the gateway (and so the reviewers)


def demo_settings(settings: Settings, run_dir: Path, base_path: Path, kb: Path) -> Settings:
    """The user's settings with the demo's folder, database, route and a loop sized for minutes, not days."""
    data = settings.model_dump()
    data.update(var_dir=run_dir, database={"url": f"sqlite:///{(run_dir / 'tunegate.db').as_posix()}", "echo": False})
    data["base_model"]["path"] = base_path
    data["review"]["sample_rate"] = 0.5
    data["routes"] = {
        ROUTE: {
            "targets": [{"adapter": None}],
            "knowledge_base": str(kb),
            "policy": {"annotate_at": 0.3, "hold_at": 0.5, "block_at": 1.01},
        }
    }
    data["loop"] = {
        "window_s": 20,
        "score_sample_rate": 1.0,
        "review_budget_per_day": 40,
        "holdout_size": 80,
        "test_share": 0.2,
        # Measured on one run's reviewed labels (held-out phrasings of the reviewed facts / the 80-item
        # holdout): replay 300, lr 4e-3: 0.96 / 2 items lost; replay 300, lr 3e-3: 0.92 / 1-3 lost;
        # replay 900, 500 steps, lr 3e-3: 0.94 / none lost. The gate refuses 2 lost of 80 (margin 0.05).
        "replay_rows": 900,
        "train_max_steps": 500,
        "train_learning_rate": 3e-3,
        "trigger": {"min_new_labels": 170, "quality_below": 0.0, "on_drift": False, "cooldown_s": 3600},
        "gate": {"min_effect": 0.3, "expected_discordance": 0.35, "holdout_margin": 0.05},
        # On vLLM's CPU build an adapter answers 2-5x slower than the base model (`tunegate bench lora`:
        # 0.17-0.25 of its throughput; a canary step measured 4.4x at p95), which says nothing about the
        # adapter: the demo's latency limit is wide. On a GPU the default (1.5x) holds.
        "canary": {"steps": [0.1, 0.5, 1.0], "step_requests": 12, "max_latency_ratio": 8.0},
        "drift": {"reference_size": 100, "window_size": 100},
    }
    return type(settings).model_validate(data)


def _calibrate(settings: Settings, domain, cache_dir: Path) -> dict:
    """`tunegate guard calibrate` on the embedded labelled grounding set (generated for the guardrails).
    The fit is kept beside the base model, named by a hash of the rows and the detectors, so a second
    demo reuses it instead of running every detector over 991 rows again."""
    import shutil as files

    from core.io import sha256_text
    from guardrails.calibration import Calibration
    from guardrails.guard import calibration_path_for, fit_calibration
    from guardrails.registry import build_detectors

    rows = domain.grounding_rows()
    key = sha256_text(json.dumps([rows, settings.guardrails.detectors], sort_keys=True))[:16]
    cached = cache_dir / f"calibration-{key}.json"
    target = calibration_path_for(settings.guardrails, settings.var_dir)
    reused = cached.exists()
    if not reused:
        fit_calibration(rows, build_detectors(settings.guardrails), source="embedded grounding set").save(cached)
    target.parent.mkdir(parents=True, exist_ok=True)
    files.copyfile(cached, target)
    return {"rows": len(rows), "threshold": Calibration.load(target).threshold, "reused": reused}


def _plot(acc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["old facts\n(before drift)", "reviewed drift\nfacts", "unseen\nphrasing", "drift no reviewer\nsaw"]
    before = [
        acc["accuracy_before_drift"],
        acc["accuracy_on_drift_before_retrain"],
        acc["accuracy_unseen_template_before"],
        acc["accuracy_on_unreviewed_drift_before"],
    ]
    after = [
        acc["accuracy_old_facts_after"],
        acc["accuracy_on_drift_after_retrain"],
        acc["accuracy_unseen_template_after"],
        acc["accuracy_on_unreviewed_drift_after"],
    ]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    xs, width = range(len(labels)), 0.38
    for offset, values, label, color in (
        (-width / 2, before, "base model", "#999999"),
        (width / 2, after, "promoted adapter", "#3b7dd8"),
    ):
        bars = ax.bar([x + offset for x in xs], values, width, label=label, color=color)
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in values], fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("exact-answer accuracy\n(vLLM, held-out phrasings)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("What the route knows, before the drift and after the loop")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    for name in ("trl", "peft", "accelerate", "httpx", "torch", "tunegate.loop"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(trl|peft|transformers|accelerate|torch|sklearn)(\.|$)")


def run_demo(settings: Settings, console: Console) -> dict:
    quiet_libraries()
    from core.db import migrate
    from core.io import free_port
    from core.vllm import VllmServer
    from training.base_model import ensure_base_model
    from training.domain import Domain
    from tunegate.demo_loop import DemoLoop

    started = time.perf_counter()
    out = settings.var_dir / "demo"
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)

    console.rule("0 s · 1. the domain, the base model, the guardrails")
    domain = Domain()
    build = ensure_base_model(settings.models_dir, progress=True)
    console.print(
        f"{len(domain.codes)} tariffs, {len(domain.facts)} facts: {len(domain.old_facts)} old (the base model "
        f"learnt them), {len(domain.new_facts)} new (they appear later: the drift). Base model "
        f"{'reused' if build.reused else 'built'}: a {build.params:,}-parameter Llama, {build.path}"
    )
    kb = write_jsonl(run_dir / "knowledge_base.jsonl", ({"text": p} for p in domain.knowledge_base.values()))
    s = demo_settings(settings, run_dir, build.path, kb)
    migrate.upgrade(s.database_url)
    calibration = _calibrate(s, domain, settings.models_dir)
    console.print(
        f"guardrails: a logistic risk over the detectors {'(reused) ' if calibration['reused'] else ''}fitted on "
        f"{calibration['rows']} labelled grounding "
        f"examples (threshold {calibration['threshold']:.2f}); the route holds answers from risk 0.5"
    )
    name = s.base_model.served_name
    with VllmServer(build.path, name, s.vllm, port=free_port(), log_path=out / "vllm-demo.log") as server:
        s = s.model_copy(update={"vllm": s.vllm.model_copy(update={"url": server.url})})
        demo = DemoLoop(s, server.url, domain, console, ROUTE, N_REVIEWED_FACTS, started)
        report = demo.run()
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    _plot(report["accuracy"], out / "knowledge.png")
    summary = {k: v for k, v in report.items() if k != "accuracy"} | report["accuracy"]
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    _table(console, report["accuracy"])
    console.rule("done")
    loop = (
        f"the loop took {report['loop_seconds']} s from the first drift label to the promoted adapter at 100 %"
        if report["promoted"]
        else f"no adapter was promoted ({report['loop_seconds']} s after the first drift label)"
    )
    console.print(
        f"{report['total_seconds']} s in all; {loop}. Results: {out / 'report.json'}; plot: {out / 'knowledge.png'}; "
        f"the loop's report (quality, drift, review, adapter timeline): {report['loop_report']}"
    )
    return summary


def _table(console: Console, acc: dict) -> None:
    table = Table("", "base model", "after the loop", title="exact-answer accuracy through vLLM (ground truth)")
    table.add_row(
        "old facts (held-out phrasings)",
        f"{acc['accuracy_before_drift']:.1%}",
        f"{acc['accuracy_old_facts_after']:.1%}",
    )
    table.add_row(
        "drifted facts reviewers saw (held-out phrasings)",
        f"{acc['accuracy_on_drift_before_retrain']:.1%}",
        f"{acc['accuracy_on_drift_after_retrain']:.1%}",
    )
    table.add_row(
        "the same facts, a phrasing no training used",
        f"{acc['accuracy_unseen_template_before']:.1%}",
        f"{acc['accuracy_unseen_template_after']:.1%}",
    )
    table.add_row(
        "drifted facts no reviewer saw",
        f"{acc['accuracy_on_unreviewed_drift_before']:.1%}",
        f"{acc['accuracy_on_unreviewed_drift_after']:.1%}",
    )
    table.add_row(
        "the route's frozen holdout (reviewed answers)",
        f"{acc['holdout_accuracy_before']:.1%}",
        f"{acc['holdout_accuracy_after']:.1%}",
    )
    console.print(table)
