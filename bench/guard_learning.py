"""The guard learning from reviews, measured: `tunegate bench guard-learning [--json]`.

A route starts cold (the calibration fitted on HaluEval dev only) and adapts from its reviewers'
verdicts. This measures how fast: `--data` (default `ragtruth-qa-dev`) is split by context (`qid`:
rows sharing passages stay on one side) into a fixed evaluation split (`eval_share` of the contexts)
and a pool that plays the route's reviewed traffic. For each number of reviewed items n (0, 50, 100,
200, 400; capped at the pool's size, the cap is reported), `draws` random draws of n pool rows become
reviewer verdicts (approve: supported; reject: hallucinated; `guardrails.calibration.rows_from_reviews`)
and the guard is adapted the product's two ways:
- `refit`: the calibrated risk re-fitted on those verdicts alone, what the loop's re-fit does
  (`evalsuite.agreement.refit_calibration` fits `Calibration.fit` on the reviews' detector results);
- `fine_tune` (n >= `fine_tune_from`, the first draw only: it costs about a minute per size on 2 cores):
  the learned grounding model trained further on those verdicts (`guardrails.grounding_training.fine_tune`),
  then the calibration re-fitted on them with the fine-tuned model's scores.
Each is measured on the evaluation split, which no step ever fits on: balanced accuracy, F1, AUROC,
hold rate (share flagged) against the true rate. n = 0 is the cold start for both.

Prints one JSON object; writes `guard_learning.json` and `guard_learning.png` (balanced accuracy against
reviewed items, one line per way) to `--out`.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("bench/out/guard")
SIZES = (0, 50, 100, 200, 400)


def _score(model, vectors, labels) -> dict[str, Any]:
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    risks = np.array([model.risk_of_vector(v) for v in vectors])
    flagged = risks >= model.threshold
    y = np.asarray(labels, bool)
    return {
        "balanced_accuracy": round(float(balanced_accuracy_score(y, flagged)), 4),
        "f1": round(float(f1_score(y, flagged, zero_division=0)), 4),
        "auroc": round(float(roc_auc_score(y, risks)), 4),
        "hold_rate": round(float(flagged.mean()), 4),
    }


def _mean(scores: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: round(sum(s[k] for s in scores) / len(scores), 4) for k in scores[0]}
    out["draws"] = len(scores)
    return out


def split_by_context(rows: list[dict[str, Any]], eval_share: float, seed: int) -> tuple[list[int], list[int]]:
    """(evaluation indices, pool indices), whole contexts on one side."""
    contexts = sorted({str(r.get("qid") or r.get("knowledge")) for r in rows})
    random.Random(seed).shuffle(contexts)
    held = set(contexts[: max(1, round(len(contexts) * eval_share))])
    evaluation = [i for i, r in enumerate(rows) if str(r.get("qid") or r.get("knowledge")) in held]
    return evaluation, [i for i in range(len(rows)) if i not in set(evaluation)]


def run(
    data: Path,
    calibrate: Path,
    out: Path = DEFAULT_OUT,
    settings: Any = None,
    sizes: tuple[int, ...] = SIZES,
    draws: int = 3,
    eval_share: float = 1 / 3,
    fine_tune_from: int = 100,
    seed: int = 0,
    threads: int = 1,
) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from core.settings import GuardrailSettings
    from guardrails.calibration import Calibration, CalibrationError, feature_vector, read_labelled, rows_from_reviews
    from guardrails.guard import check_input, run_detectors
    from guardrails.registry import build_detectors

    torch.set_num_threads(threads)
    started = time.perf_counter()
    settings = settings or GuardrailSettings()
    detectors = build_detectors(settings)
    rows, dev = read_labelled(data), read_labelled(calibrate)
    evaluation, pool = split_by_context(rows, eval_share, seed)
    labels = [bool(r["hallucinated"]) for r in rows]

    def vectors_of(items, dets):
        return [feature_vector(run_detectors(dets, check_input(r))) for r in items]

    vectors = vectors_of(rows, detectors)
    eval_vectors, eval_labels = [vectors[i] for i in evaluation], [labels[i] for i in evaluation]
    cold = Calibration.fit(vectors_of(dev, detectors), [bool(r["hallucinated"]) for r in dev], source=str(calibrate))
    curve: dict[str, dict[str, Any]] = {"refit": {}, "fine_tune": {}}
    curve["refit"]["0"] = curve["fine_tune"]["0"] = {**_score(cold, eval_vectors, eval_labels), "draws": 1}
    rng = random.Random(seed)
    capped = {}
    for n in sizes:
        if n == 0:
            continue
        used = min(n, len(pool))
        capped[str(n)] = used
        scores, tuned = [], []
        for draw in range(draws):
            chosen = rng.sample(pool, used)
            verdicts = [
                {
                    "question": rows[i].get("question", ""),
                    "context": rows[i].get("knowledge", ""),
                    "answer": rows[i]["answer"],
                    "verdict": "reject" if labels[i] else "approve",
                }
                for i in chosen
            ]
            reviewed = rows_from_reviews(verdicts)
            y = [bool(r["hallucinated"]) for r in reviewed]
            try:
                fitted = Calibration.fit([vectors[i] for i in chosen], y, source=f"{used} reviews")
            except CalibrationError:
                continue  # a draw with one class only: the loop would not re-fit either
            scores.append(_score(fitted, eval_vectors, eval_labels))
            if draw == 0 and used >= fine_tune_from and "grounding_model" in detectors:
                tuned.append(_fine_tuned(detectors, reviewed, [rows[i] for i in evaluation], eval_labels, vectors_of))
        if scores:
            curve["refit"][str(n)] = _mean(scores)
        if tuned:
            curve["fine_tune"][str(n)] = _mean(tuned)
    result = {
        "data": str(data),
        "calibrated_cold_on": str(calibrate),
        "protocol": (
            f"{data} split by context: {len(evaluation)} rows ({len({rows[i].get('qid') for i in evaluation})} "
            f"contexts) evaluate, never fitted on; reviewed items drawn from the other {len(pool)} rows"
        ),
        "eval_rows": len(evaluation),
        "eval_true_rate": round(sum(eval_labels) / len(eval_labels), 4),
        "pool_rows": len(pool),
        "reviewed_used": capped,
        "detectors": list(detectors),
        "curve": curve,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "guard_learning.json").write_text(json.dumps(result, indent=2))
    _plot(out / "guard_learning.png", result)
    result["plot"] = str(out / "guard_learning.png")
    return result


def _fine_tuned(detectors, reviewed, eval_rows, eval_labels, vectors_of) -> dict[str, Any]:
    from guardrails.calibration import Calibration
    from guardrails.detectors.grounding_model import GroundingModelDetector
    from guardrails.grounding_training import fine_tune

    base = detectors["grounding_model"]
    with tempfile.TemporaryDirectory() as tmp:
        fine_tune(base.model.path, Path(tmp) / "tuned", reviewed)
        tuned = {**detectors, "grounding_model": GroundingModelDetector(Path(tmp) / "tuned", budget_ms=None)}
        fitted = Calibration.fit(vectors_of(reviewed, tuned), [bool(r["hallucinated"]) for r in reviewed])
        return _score(fitted, vectors_of(eval_rows, tuned), eval_labels)


def _plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for way, points in result["curve"].items():
        xs = sorted(points, key=int)
        ax.plot([int(x) for x in xs], [points[x]["balanced_accuracy"] for x in xs], marker="o", label=way)
    ax.set(
        xlabel="reviewed items used",
        ylabel="balanced accuracy (evaluation split)",
        title=f"guard learning from reviews: {Path(result['data']).name}",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
