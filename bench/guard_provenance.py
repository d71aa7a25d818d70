"""What `tunegate bench guard`'s numbers rest on, and how well its reported spans match the gold ones.

Owns `measured_on` (the data: path, SHA-256, README heading, rows, contexts, calibration overlap),
`provenance` (per detector with a trained model of ours, what it was trained on and how many measured
rows occur in those training files: they must be 0 for a number to count as held out) and
`span_scores` (character-level precision, recall and F1 of the unsupported spans against the rows'
gold `spans`). Split from `bench/guard.py` to keep each file readable; imports `core.io` and
`guardrails.calibration` (lazily).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def row_key(row: Mapping[str, Any]) -> tuple[str, str, str]:
    return (str(row.get("knowledge", row.get("context")) or ""), str(row.get("question", "")), str(row["answer"]))


def measured_on(data: Path, rows: list[dict[str, Any]], calibrated_on: str | None, overlap: int | None) -> dict:
    """What the numbers were measured on, and whether those rows were used for the calibration."""
    from core.io import sha256_file

    readme = Path(data).parent / "README.md"
    lines = [ln for ln in readme.read_text().splitlines() if ln.strip()] if readme.exists() else []
    return {
        "path": str(data),
        "sha256": sha256_file(data),
        "description": lines[0].lstrip("# ").strip() if lines else None,  # the README's heading
        "rows": len(rows),
        "contexts": len({row_key(r)[0] for r in rows}),
        "calibrated_on": calibrated_on,
        "measured_rows_in_calibration": overlap,  # None: not known (a calibration file fitted elsewhere)
    }


def training_sets(detectors: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Per detector, what its model was trained on (None: no trained model of ours), with the training
    rows' keys under `_keys` (None when a training file is missing or unreadable)."""
    from guardrails.calibration import CalibrationError, read_labelled

    out: dict[str, dict[str, Any] | None] = {}
    for name, detector in detectors.items():
        model = getattr(detector, "model", None)
        meta = getattr(model, "meta", None)
        if not isinstance(meta, dict):
            out[name] = None
            continue
        folder = getattr(model, "path", None)
        metrics = Path(folder) / "metrics.json" if folder is not None else None
        trained_on = None
        if metrics is not None and metrics.is_file():
            trained_on = json.loads(metrics.read_text()).get("trained_on")
        files = [Path(p) for p in trained_on or []]
        missing = [str(p) for p in files if not p.is_file()]
        keys = None
        if files and not missing:
            try:
                keys = {row_key(r) for p in files for r in read_labelled(p)}
            except CalibrationError:
                keys = None
        out[name] = {
            "model": str(folder) if folder is not None else None,
            "data_sha256": meta.get("data_sha256"),
            "rows": meta.get("rows"),
            "trained_on": trained_on,
            "missing": missing,
            "_keys": keys,
        }
    return out


def provenance(rows, calibrated_on, overlap, trained: Mapping[str, dict[str, Any] | None]) -> dict[str, Any]:
    by_detector: dict[str, Any] = {}
    for name, info in trained.items():
        if info is None:
            by_detector[name] = None
            continue
        keys = info["_keys"]
        shown = {k: v for k, v in info.items() if k != "_keys"}
        shown["measured_rows_in_training"] = None if keys is None else sum(row_key(r) in keys for r in rows)
        by_detector[name] = shown
    return {
        "calibrated_on": calibrated_on,
        "measured_rows_in_calibration": overlap,
        "detectors_trained_on": by_detector,
    }


def _chars(spans: Any, length: int) -> set[int]:
    return {c for a, b in (spans or []) for c in range(max(0, int(a)), min(int(b), length))}


def span_scores(rows: list[dict[str, Any]], plan: list, every: list) -> dict[str, Any] | None:
    """Character-level precision, recall and F1 of the reported unsupported spans against the rows' gold
    `spans`, micro-averaged over the rows that have the key; None when none has it."""
    marked = [i for i, r in enumerate(rows) if "spans" in r]
    if not marked:
        return None

    def score(predicted) -> dict[str, Any]:
        tp = n_pred = n_gold = 0
        for i in marked:
            length = len(str(rows[i]["answer"]))
            gold, pred = _chars(rows[i]["spans"], length), _chars(predicted(i), length)
            tp, n_pred, n_gold = tp + len(gold & pred), n_pred + len(pred), n_gold + len(gold)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_gold if n_gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "gold_chars": n_gold,
            "predicted_chars": n_pred,
        }

    names = list(dict.fromkeys(n for rep in every for n in rep.results))
    by_detector = {
        name: score(lambda i, name=name: every[i].results[name].unsupported_spans if name in every[i].results else [])
        for name in names
    }
    return {"rows": len(marked), **score(lambda i: plan[i].unsupported_spans()), "by_detector": by_detector}
