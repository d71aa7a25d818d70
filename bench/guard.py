"""The hallucination guardrail, measured: `tunegate bench guard --data FILE.jsonl [--calibrate DEV.jsonl]`.

Runs the default detectors (grounding, embedding, uncertainty; `guardrails.detectors` decides) on
labelled rows `{knowledge, question, answer, hallucinated}` through `Guard.check`, on ONE CPU core
(`torch.set_num_threads(1)`), and reports balanced accuracy, AUROC and F1 of "risk >= threshold"
against the labels, and the latency per check (p50, p99; also p50 of the checks whose context the
embedding cache had not seen yet).

Protocols (the output's `protocol` says which one ran):
- `--calibrate DEV.jsonl`: the calibrated risk (weights and threshold) is fitted on DEV only, then
  measured on `--data`;
- `--folds K`: grouped K-fold cross-validation on `--data` (rows sharing a context stay in one fold):
  fitted on K-1 folds, measured on the held-out one, the predictions pooled;
- neither: the calibration file given (`--calibration`, else the settings' one), or the documented
  default combination when there is none.

Prints one JSON object; writes `guard_<data>[_cv<K>|_cal-<DEV>].json` and `.png` (ROC curve and
latency histogram) to `--out`. Run: `python -m bench.guard --data FILE.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("bench/out/guard")


def _metrics(labels: list[bool], risks: list[float], predicted: list[bool]) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    return {
        "balanced_accuracy": round(float(balanced_accuracy_score(labels, predicted)), 4),
        "auroc": round(float(roc_auc_score(labels, risks)), 4),
        "f1": round(float(f1_score(labels, predicted)), 4),
        "precision": round(float(precision_score(labels, predicted, zero_division=0)), 4),
        "recall": round(float(recall_score(labels, predicted)), 4),
    }


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return round(float(np.percentile(values, q)), 3) if values else float("nan")


def _plot(path: Path, labels: list[bool], risks: list[float], timings: list[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(labels, risks)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(fpr, tpr, label=f"AUROC {roc_auc_score(labels, risks):.3f}")
    ax1.plot([0, 1], [0, 1], ls=":", c="grey")
    ax1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC of the calibrated risk")
    ax1.legend(loc="lower right")
    ax2.hist(timings, bins=50, color="tab:orange")
    p50 = statistics.median(timings)
    ax2.axvline(p50, c="k", ls="--", label=f"p50 {p50:.2f} ms")
    ax2.set(xlabel="ms per check (1 CPU core)", ylabel="checks", title="latency of Guard.check")
    ax2.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    data: Path,
    out: Path = DEFAULT_OUT,
    calibrate: Path | None = None,
    calibration: Path | None = None,
    folds: int = 0,
    settings: Any = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Measure the guard on `data`; see the module docstring for the protocols."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from core.settings import GuardrailSettings
    from guardrails.calibration import Calibration, DefaultCombination, feature_vector, read_labelled
    from guardrails.guard import Guard, check_input, fit_calibration
    from guardrails.registry import build_detectors

    torch.set_num_threads(threads)
    settings = settings or GuardrailSettings()
    if calibrate and folds:
        raise ValueError("use `--calibrate` or `--folds`, not both")
    rows = read_labelled(data)
    labels = [bool(r["hallucinated"]) for r in rows]
    detectors = build_detectors(settings)

    fit_s = 0.0
    if calibrate:
        started = time.perf_counter()
        risk_model: Any = fit_calibration(read_labelled(calibrate), detectors, source=str(calibrate))
        fit_s = time.perf_counter() - started
        protocol = f"calibrated on {calibrate} only, measured on {data}"
    elif calibration and Path(calibration).exists():
        risk_model = Calibration.load(calibration)
        protocol = f"calibration file {calibration} (fitted on {risk_model.trained_on.get('source') or '?'})"
    else:
        risk_model = DefaultCombination()
        protocol = "default combination (no calibration file), threshold 0.5"
    guard = Guard(settings, detectors=detectors, risk_model=risk_model)

    # Warm-up outside the measurement: the first forward passes of a model allocate and pack weights.
    for r in rows[:3]:
        guard.check(check_input({**r, "knowledge": (r.get("knowledge") or "") + " warm-up"}))

    seen_contexts: set[str] = set()
    timings, new_context_timings, vectors, risks = [], [], [], []
    for r in rows:
        inp = check_input(r)
        verdict = guard.check(inp)
        timings.append(verdict.total_ms)
        if inp.context not in seen_contexts:
            new_context_timings.append(verdict.total_ms)
            seen_contexts.add(inp.context)
        vectors.append(feature_vector(verdict.results))
        risks.append(verdict.risk)

    if folds and folds > 1:
        from sklearn.model_selection import GroupKFold

        groups = [r.get("knowledge") or r.get("question") for r in rows]
        risks = [0.0] * len(rows)
        predicted = [False] * len(rows)
        thresholds = []
        for train, test in GroupKFold(n_splits=folds).split(rows, labels, groups):
            fitted = Calibration.fit([vectors[i] for i in train], [labels[i] for i in train], source=f"{data} folds")
            thresholds.append(fitted.threshold)
            for i in test:
                risks[i] = fitted.risk_of_vector(vectors[i])
                predicted[i] = risks[i] >= fitted.threshold
        threshold = float(np.mean(thresholds))
        protocol = f"grouped {folds}-fold cross-validation on {data} (fit on {folds - 1} folds, measured on the rest)"
        risk_model = Calibration.fit(vectors, labels, source=str(data))  # for the weights shown only
    else:
        threshold = float(risk_model.threshold)
        predicted = [r >= threshold for r in risks]

    per_detector = {}
    for name in detectors:
        known = [(v[name], y) for v, y in zip(vectors, labels, strict=True) if v.get(name) is not None]
        ys = [y for _, y in known]
        auroc = None
        if known and any(ys) and not all(ys):
            from sklearn.metrics import roc_auc_score

            auroc = round(float(roc_auc_score(ys, [s for s, _ in known])), 4)
        per_detector[name] = {"known": round(len(known) / len(rows), 4), "auroc": auroc}

    result: dict[str, Any] = {
        "data": str(data),
        "protocol": protocol,
        "n": len(rows),
        "hallucinated": int(sum(labels)),
        **_metrics(labels, risks, predicted),
        "threshold": round(threshold, 4),
        "p50_ms": _percentile(timings, 50),
        "p99_ms": _percentile(timings, 99),
        "mean_ms": round(float(np.mean(timings)), 3),
        "p50_ms_new_context": _percentile(new_context_timings, 50),
        "new_contexts": len(new_context_timings),
        "threads": threads,
        "detectors": per_detector,
        "risk_model": risk_model.kind,
        "weights": risk_model.weights() if isinstance(risk_model, Calibration) else risk_model.weights,
        "calibration_fit_s": round(fit_s, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_cv{folds}" if folds and folds > 1 else f"_cal-{Path(calibrate).stem}" if calibrate else ""
    stem = f"guard_{Path(data).stem}{suffix}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    title = f"{Path(data).name}: {protocol}\nBA {result['balanced_accuracy']}, p50 {result['p50_ms']} ms"
    _plot(out / f"{stem}.png", labels, risks, timings, title)
    result["plot"] = str(out / f"{stem}.png")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="Labelled JSONL to measure on.")
    parser.add_argument("--calibrate", type=Path, help="Labelled JSONL to fit weights and threshold on (only).")
    parser.add_argument("--calibration", type=Path, help="A calibration file to use instead.")
    parser.add_argument("--folds", type=int, default=0, help="Grouped K-fold cross-validation on --data.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Folder for the JSON and plot.")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.data, args.out, args.calibrate, args.calibration, args.folds)))


if __name__ == "__main__":
    main()
