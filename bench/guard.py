"""The hallucination guardrail, measured: `tunegate bench guard --data FILE.jsonl [--data ...] [--calibrate DEV]`.

Runs the configured detectors (grounding, embedding, uncertainty; `guardrails.detectors` decides) on
labelled rows `{knowledge, question, answer, hallucinated}` through `Guard.check`, on ONE CPU core
(`torch.set_num_threads(1)`), twice in one run on the same rows: `all` (every configured detector,
`Guard(only_weighted=False)`) and `plan` (only the detectors the risk model weighs, what the gateway
runs). For each: balanced accuracy, AUROC and F1 of "risk >= threshold" against the labels,
`hold_rate` (the share of rows with risk >= the threshold: what the guard would hold) and the
latency per check (p50, p95, p99), separately for checks whose context was seen before in the run
(`repeated_context`) and for the first check of each context (`new_context`: the detectors' caches
are cleared before each run, so that passage is new to them). `risk_identical` says whether the plan
gave exactly the risks of the full run (it must: the skipped detectors have no weight). The top-level
metrics and latencies are the plan's, beside `true_rate` (the share of rows labelled hallucinated).
`measured_on` names the data (path, SHA-256, the heading of a README.md beside it) and whether, and
how, its rows were used for the calibration.

`span` (null when no row has a `spans` key): where rows carry `spans` (gold `[start, end)` character
offsets into `answer` of the hallucinated parts), the character-level precision, recall and F1 of
the unsupported spans the guard reports (`RiskReport.unsupported_spans()` of the plan run), micro-
averaged over the characters of the `rows` that have the key (an empty list: nothing hallucinated);
`by_detector` scores each detector's own `unsupported_spans` (from the `all` run, so every configured
detector is there). The spans are scored whatever the risk (not only on held answers).

`provenance`: what the numbers rest on. `calibrated_on` and `measured_rows_in_calibration` (as in
`measured_on`), and `detectors_trained_on`: per detector, null for one with no trained model of ours
(rule-based, or off-the-shelf weights), else the model's folder, its training data's hash and row
count (`recipe.json`), the training files (`trained_on` of its `metrics.json`) and
`measured_rows_in_training`: how many measured rows (by knowledge, question and answer) occur in
those files (null when a file is missing: `missing` lists them).

Protocols (the output's `protocol` says which one ran):
- `--calibrate DEV.jsonl`: the calibrated risk (weights and threshold) is fitted on DEV only, once,
  then measured on each `--data`;
- `--folds K`: grouped K-fold cross-validation within each `--data` (rows sharing a context stay in one
  fold): fitted on K-1 folds, measured on the held-out one; each fold's calibration makes its own plan;
- neither: the calibration file given (`--calibration`, else the settings' one), or the documented
  default combination when there is none.

Several `--data`: each is measured on its own with the same protocol, and the output is
`{"datasets": {<file stem>: <that data's result, the one-data shape>}, "plot": ..., ...}`.

Prints one JSON object; writes `guard_<data>[+<data2>...][_cv<K>|_cal-<DEV>].json` and `.png` (one ROC
curve per data set; the latency histograms of both runs, every data set's checks together) to `--out`.
Run: `python -m bench.guard --data FILE.jsonl [--data MORE.jsonl]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.guard_provenance import measured_on, provenance, row_key, span_scores, training_sets

DEFAULT_OUT = Path("bench/out/guard")


def _metrics(labels: list[bool], risks: list[float], predicted: list[bool]) -> dict[str, float | None]:
    from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    both = any(labels) and not all(labels)  # AUROC needs both classes
    return {
        "balanced_accuracy": round(float(balanced_accuracy_score(labels, predicted)), 4),
        "auroc": round(float(roc_auc_score(labels, risks)), 4) if both else None,
        "f1": round(float(f1_score(labels, predicted, zero_division=0)), 4),
        "precision": round(float(precision_score(labels, predicted, zero_division=0)), 4),
        "recall": round(float(recall_score(labels, predicted, zero_division=0)), 4),
    }


def _percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return round(float(np.percentile(values, q)), 3) if values else None


def _latency(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": _percentile(values, 50),
        "p95_ms": _percentile(values, 95),
        "p99_ms": _percentile(values, 99),
        "mean_ms": round(statistics.fmean(values), 3) if values else None,
    }


def _plot(
    path: Path, curves: list[tuple[str, list[bool], list[float]]], runs: dict[str, list[float]], title: str
) -> None:
    """One ROC curve per `(name, labels, risks)` on the left; the latency histogram of each run on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, labels, risks in curves:
        if any(labels) and not all(labels):  # one class only: no curve
            fpr, tpr, _ = roc_curve(labels, risks)
            ax1.plot(fpr, tpr, label=f"{name}: AUROC {roc_auc_score(labels, risks):.3f}")
    ax1.plot([0, 1], [0, 1], ls=":", c="grey")
    ax1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC of the calibrated risk")
    ax1.legend(loc="lower right", fontsize=8)
    every = [t for timings in runs.values() for t in timings]
    bins = np.geomspace(max(min(every), 1e-3), max(max(every), 2e-3), 60)
    for (name, timings), colour in zip(runs.items(), ("tab:grey", "tab:orange"), strict=False):
        p50 = statistics.median(timings)
        ax2.hist(timings, bins=bins, color=colour, alpha=0.6, label=f"{name}: p50 {p50:.2f} ms")
        ax2.axvline(p50, c=colour, ls="--")
    scope = "every data set's checks" if len(curves) > 1 else "every check"
    ax2.set(
        xscale="log", xlabel="ms per check (1 CPU core)", ylabel="checks", title=f"latency of Guard.check ({scope})"
    )
    ax2.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fit_dev(calibrate: Path, detectors) -> tuple[Any, set, float]:
    """The risk model fitted on DEV (once for every data set), DEV's row keys, and the fitting time."""
    from guardrails.calibration import read_labelled
    from guardrails.guard import fit_calibration

    started = time.perf_counter()
    dev = read_labelled(calibrate)
    model = fit_calibration(dev, detectors, source=str(calibrate))
    return model, {row_key(r) for r in dev}, time.perf_counter() - started


def _risk_models(data, rows, labels, detectors, calibrate, dev_fit, calibration, folds):
    """The risk model(s), the index of the one that scores each row, the protocol in words, where it
    was fitted, how many measured rows it saw, and the fitting time."""
    from guardrails.calibration import Calibration, DefaultCombination, feature_vector
    from guardrails.guard import check_input, run_detectors

    started = time.perf_counter()
    if folds and folds > 1:
        from sklearn.model_selection import GroupKFold

        vectors = [feature_vector(run_detectors(detectors, check_input(r))) for r in rows]  # untimed
        groups = [r.get("knowledge") or r.get("question") for r in rows]
        models, row_model = [], [0] * len(rows)
        for k, (train, test) in enumerate(GroupKFold(n_splits=folds).split(rows, labels, groups)):
            source = f"{data} folds other than {k}"
            models.append(Calibration.fit([vectors[i] for i in train], [labels[i] for i in train], source=source))
            for i in test:
                row_model[i] = k
        protocol = f"grouped {folds}-fold cross-validation on {data} (fit on {folds - 1} folds, measured on the rest)"
        return models, row_model, protocol, f"{data}, the other {folds - 1} folds", 0, time.perf_counter() - started
    row_model = [0] * len(rows)
    if calibrate:
        model, dev_keys, fit_s = dev_fit
        overlap = len({row_key(r) for r in rows} & dev_keys)
        protocol = f"calibrated on {calibrate} only, measured on {data}"
        return [model], row_model, protocol, str(calibrate), overlap, fit_s
    if calibration and Path(calibration).exists():
        model = Calibration.load(calibration)
        source = model.trained_on.get("source") or "?"
        return [model], row_model, f"calibration file {calibration} (fitted on {source})", source, None, 0.0
    protocol = "default combination (no calibration file), threshold 0.5"
    return [DefaultCombination()], row_model, protocol, None, 0, 0.0


def _timed_run(guards: list, row_model: list[int], rows: list[dict[str, Any]]) -> dict[str, list]:
    """Every row checked once, caches cleared first: risks, timings, and whether the context was new."""
    from guardrails.guard import check_input

    for guard in guards:
        guard.clear_caches()
    seen: set[str | None] = set()
    out: dict[str, list] = {"risks": [], "ms": [], "new": [], "reports": []}
    for r, k in zip(rows, row_model, strict=True):
        inp = check_input(r)
        report = guards[k].check(inp)
        out["risks"].append(report.risk)
        out["ms"].append(report.total_ms)
        out["new"].append(inp.context not in seen)
        out["reports"].append(report)
        seen.add(inp.context)
    return out


def _summary(labels: list[bool], run: dict[str, list], thresholds: list[float], guards: list) -> dict[str, Any]:
    predicted = [r >= t for r, t in zip(run["risks"], thresholds, strict=True)]
    ms, new = run["ms"], run["new"]
    return {
        "detectors": list(dict.fromkeys(n for g in guards for n in g.active)),
        **_metrics(labels, run["risks"], predicted),
        "hold_rate": round(sum(predicted) / len(predicted), 4),
        "latency": {
            "all_checks": _latency(ms),
            "repeated_context": _latency([t for t, n in zip(ms, new, strict=True) if not n]),
            "new_context": _latency([t for t, n in zip(ms, new, strict=True) if n]),
        },
    }


def _run_one(
    data: Path,
    settings: Any,
    detectors: dict[str, Any],
    calibrate: Path | None,
    dev_fit: tuple | None,
    calibration: Path | None,
    folds: int,
    trained: Mapping[str, dict[str, Any] | None],
    threads: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One data set measured: its result (the one-data JSON, less `plot`) and what the plot needs."""
    from guardrails.calibration import Calibration, feature_vector, read_labelled
    from guardrails.guard import Guard, check_input

    rows = read_labelled(data)
    labels = [bool(r["hallucinated"]) for r in rows]
    models, row_model, protocol, calibrated_on, overlap, fit_s = _risk_models(
        data, rows, labels, detectors, calibrate, dev_fit, calibration, folds
    )
    thresholds = [float(models[k].threshold) for k in row_model]
    every = [Guard(settings, detectors=detectors, risk_model=m, only_weighted=False) for m in models]
    plan = [Guard(settings, detectors=detectors, risk_model=m) for m in models]

    # Warm-up outside the measurement: the first forward passes of a model allocate and pack weights.
    for r in rows[:3]:
        every[0].check(check_input({**r, "knowledge": (r.get("knowledge") or "") + " warm-up"}))
    runs = {"all": _timed_run(every, row_model, rows), "plan": _timed_run(plan, row_model, rows)}
    diff = max(abs(a - b) for a, b in zip(runs["all"]["risks"], runs["plan"]["risks"], strict=True))
    guards = {"all": every, "plan": plan}
    summaries = {name: _summary(labels, r, thresholds, guards[name]) for name, r in runs.items()}
    summaries["plan"]["skipped"] = [n for n in detectors if n not in summaries["plan"]["detectors"]]
    if len(plan) > 1:
        summaries["plan"]["per_fold"] = [list(g.active) for g in plan]

    vectors = [feature_vector(rep.results) for rep in runs["all"]["reports"]]
    per_detector = {}
    for name in detectors:
        known = [(v[name], y) for v, y in zip(vectors, labels, strict=True) if v.get(name) is not None]
        ys = [y for _, y in known]
        auroc = None
        if known and any(ys) and not all(ys):
            from sklearn.metrics import roc_auc_score

            auroc = round(float(roc_auc_score(ys, [s for s, _ in known])), 4)
        weighted = any(m.weighs(name) for m in models)
        per_detector[name] = {"known": round(len(known) / len(rows), 4), "auroc": auroc, "weighted": weighted}

    shown = models[0] if len(models) == 1 else Calibration.fit(vectors, labels, source=str(data))  # weights only
    p = summaries["plan"]
    result: dict[str, Any] = {
        "data": str(data),
        "measured_on": measured_on(data, rows, calibrated_on, overlap),
        "provenance": provenance(rows, calibrated_on, overlap, trained),
        "protocol": protocol,
        "n": len(rows),
        "hallucinated": int(sum(labels)),
        "true_rate": round(sum(labels) / len(labels), 4),
        "hold_rate": p["hold_rate"],
        **{k: p[k] for k in ("balanced_accuracy", "auroc", "f1", "precision", "recall")},
        "span": span_scores(rows, runs["plan"]["reports"], runs["all"]["reports"]),
        "threshold": round(statistics.fmean(float(m.threshold) for m in models), 4),
        "p50_ms": p["latency"]["all_checks"]["p50_ms"],
        "p95_ms": p["latency"]["all_checks"]["p95_ms"],
        "p99_ms": p["latency"]["all_checks"]["p99_ms"],
        "mean_ms": p["latency"]["all_checks"]["mean_ms"],
        "p50_ms_new_context": p["latency"]["new_context"]["p50_ms"],
        "new_contexts": p["latency"]["new_context"]["n"],
        "runs": summaries,
        "risk_identical": diff == 0.0,
        "max_risk_difference": diff,
        "plan": {
            "active": p["detectors"],
            "needs_logprobs": any(g.needs_logprobs for g in plan),
            "needs_samples": any(g.needs_samples for g in plan),
        },
        "threads": threads,
        "detectors": per_detector,
        "risk_model": shown.kind,
        "weights": shown.weights() if isinstance(shown, Calibration) else shown.weights,
        "calibration_fit_s": round(fit_s, 1),
    }
    return result, {"labels": labels, "risks": runs["plan"]["risks"], "ms": {n: r["ms"] for n, r in runs.items()}}


def _names(paths: list[Path]) -> list[str]:
    """The data sets' keys: their file stems, made unique (`stem`, `stem-2`, ...)."""
    names: list[str] = []
    for p in paths:
        name, k = p.stem, 1
        while name in names:
            k += 1
            name = f"{p.stem}-{k}"
        names.append(name)
    return names


def run(
    data: Path | list[Path],
    out: Path = DEFAULT_OUT,
    calibrate: Path | None = None,
    calibration: Path | None = None,
    folds: int = 0,
    settings: Any = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Measure the guard on `data` (one file or several), all detectors and the plan; see the module docstring."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from core.settings import GuardrailSettings
    from guardrails.registry import build_detectors

    paths = [Path(data)] if isinstance(data, str | Path) else [Path(p) for p in data]
    if not paths:
        raise ValueError("no data to measure on: give `--data` at least once")
    if calibrate and folds:
        raise ValueError("use `--calibrate` or `--folds`, not both")
    torch.set_num_threads(threads)
    settings = settings or GuardrailSettings()
    detectors = build_detectors(settings)
    dev_fit = _fit_dev(calibrate, detectors) if calibrate and not (folds and folds > 1) else None
    trained = training_sets(detectors)
    names = _names(paths)
    results, curves = {}, {}
    for name, path in zip(names, paths, strict=True):
        results[name], curves[name] = _run_one(
            path, settings, detectors, calibrate, dev_fit, calibration, folds, trained, threads
        )

    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_cv{folds}" if folds and folds > 1 else f"_cal-{Path(calibrate).stem}" if calibrate else ""
    stem = f"guard_{'+'.join(names)}{suffix}"
    plot = out / f"{stem}.png"
    ms = {run_name: [t for c in curves.values() for t in c["ms"][run_name]] for run_name in ("all", "plan")}
    rocs = [(name, c["labels"], c["risks"]) for name, c in curves.items()]
    if len(paths) == 1:
        result = results[names[0]]
        p50_all = result["runs"]["all"]["latency"]["all_checks"]["p50_ms"]
        title = (
            f"{paths[0].name}: {result['protocol']}\n"
            f"BA {result['balanced_accuracy']}; p50 {p50_all} ms all, {result['p50_ms']} ms plan"
        )
    else:
        for r in results.values():
            r["plot"] = str(plot)
        result = {
            "datasets": results,
            "protocol": (
                f"grouped {folds}-fold cross-validation within each data set"
                if folds and folds > 1
                else f"calibrated on {calibrate} only"
                if calibrate
                else next(iter(results.values()))["protocol"]
            ),
            "threads": threads,
        }
        title = "; ".join(f"{n}: BA {r['balanced_accuracy']}" for n, r in results.items()) + f"\n{result['protocol']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    _plot(plot, rocs, ms, title)
    result["plot"] = str(plot)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", type=Path, action="append", required=True, help="Labelled JSONL to measure on (repeatable)."
    )
    parser.add_argument("--calibrate", type=Path, help="Labelled JSONL to fit weights and threshold on (only).")
    parser.add_argument("--calibration", type=Path, help="A calibration file to use instead.")
    parser.add_argument("--folds", type=int, default=0, help="Grouped K-fold cross-validation within each --data.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Folder for the JSON and plot.")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.data, args.out, args.calibrate, args.calibration, args.folds)))


if __name__ == "__main__":
    main()
