"""One calibrated risk from many detector results: a logistic regression over the detectors' scores.

Owns the feature vector (each detector's score, `<name>`, and the parts it reports in
`evidence["features"]`, `<name>.<part>`), its fitting from labelled rows, its JSON file, and the
documented default combination used when no file exists, and which detectors each reads at all
(`weighs(name)`: the guard runs only those). Also turns reviewer verdicts into labelled
rows, so the guardrail can be re-calibrated from the review queue. Imports `core.io`,
`guardrails.types`, numpy and scikit-learn.

Unknown scores are handled explicitly: each feature contributes its value, imputed with the training
mean when unknown, and an "is unknown" indicator; the regression learns what a missing detector
means. A feature unknown in every training row gets no weight (listed in `unseen`).

Monotone by construction: a detector's risk going up never lowers the combined risk. After each fit,
the value feature with the most negative weight is dropped and the model refitted until no value
weight is negative (indicators may take either sign). Without this the regression happily learns
dataset artefacts, e.g. that on HaluEval a short answer (low embedding similarity) is rarely wrong.

Classes are weighted to balance, and `threshold` is the risk that maximises balanced accuracy on the
training rows (the middle of the best range), so "risk >= threshold" is the fitted decision.

A detector must earn its place (`prune`): after the fit, whole detectors are left out one at a time,
the one whose absence costs least first, while 5-fold cross-validated balanced accuracy on the fit rows
stays within `PRUNE_TOLERANCE` of the best reached (listed in `pruned`; the guard then neither loads nor
runs them). Measured with the learned grounding model (15 ms a check on HaluEval QA, nothing gained in
balanced accuracy on any dev set): without this the plan ran it on every request.

Answers longer than the fit rows: a fit knows how long its answers were (`length_range`, the 95th
percentile of their content words as a detector counts them, `evidence["words"]`: the grounding
detector does), and answers beyond it are scored by a second regression fitted on the same rows over
`TRANSFER_FEATURES` only (`transfer`), whose threshold is moved onto the first's, so "risk >= threshold"
stays the decision. Why: features that count unsupported words mean something else at 100 words than
at 5. Fitted on HaluEval QA dev's extractive answers (95% of them at most 12 content words; none of its
faithful ones has a word the context lacks), the full regression held every answer of ragtruth-qa-dev
(balanced accuracy 0.50, hold rate 1.00 against a true rate of 0.30); with the transfer, the same fit
gives 0.72 at a hold rate of 0.45 there, and 0.96 on HaluEval itself (README, "On real RAG answers").
A transfer is fitted only on extractive rows (at most `EXTRACTIVE_SHARE` of the faithful ones beyond the
paraphrase allowance): a fit on answers in their own words (a route's reviews, ragtruth-qa-dev) has seen
paraphrase, and its full regression scores every length (cross-validated on ragtruth-qa-dev, a transfer
there cost 0.013 balanced accuracy). The cost where it is fitted: HaluEval QA dev cross-validated, its
longest 5% scored by the transfer, 0.976 -> 0.955.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.io import atomic_write_json, read_jsonl
from guardrails.types import DetectorResult

VERSION = 1
OTHER_WEIGHT = 0.1  # the default combination's weight of a detector it does not name
PRUNE_TOLERANCE = 0.002  # balanced accuracy a detector must add (cross-validated) to be kept
PRUNE_MIN_ROWS = 60  # fewer rows (or fewer than 10 of a class): no pruning, the estimate is too noisy
#: What a feature vector carries beside the features: the answer's content words (never weighed).
LENGTH = "@words"
#: `length_range` is this percentile of the fit answers' lengths: one long outlier does not stretch it.
LENGTH_QUANTILE = 95
#: Features whose meaning does not change with the answer's length (module docstring).
TRANSFER_FEATURES = ("grounding.excess_log", "grounding.number")
#: A transfer is fitted only on extractive rows: at most this share of the faithful ones go beyond the
#: paraphrase allowance (`PARAPHRASE` > 0). Rows in their own words teach the full regression paraphrase.
PARAPHRASE, EXTRACTIVE_SHARE = TRANSFER_FEATURES[0], 0.1
Features = dict[str, float | None]


class CalibrationError(ValueError):
    """A calibration file or training set that cannot be used (the message says why)."""


def feature_vector(results: Mapping[str, DetectorResult] | Iterable[DetectorResult]) -> Features:
    """`{"grounding": 0.2, "grounding.number": 0.0, "embedding": None, ...}` from detector results, and
    the answer's content words under `LENGTH` where a detector counted them."""
    items = results.values() if isinstance(results, Mapping) else results
    out: Features = {}
    for r in items:
        known = r.score is not None
        words = r.evidence.get("words")
        if known and isinstance(words, int) and not isinstance(words, bool):
            out[LENGTH] = float(max(words, out.get(LENGTH) or 0))
        out[r.name] = r.score
        for key, value in (r.evidence.get("features") or {}).items():
            ok = known and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            out[f"{r.name}.{key}"] = float(value) if ok else None
    return out


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass
class Calibration:
    """A fitted logistic regression over detector features. `risk(results)` is in [0, 1]."""

    features: list[str]
    impute: list[float]  # per feature: the training mean, used when the score is unknown
    center: list[float]  # per column (values, then indicators): standardisation
    scale: list[float]
    coef: list[float]  # per column
    intercept: float
    threshold: float
    unseen: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # value features the monotone constraint removed
    pruned: list[str] = field(default_factory=list)  # detectors left out: they added no accuracy
    length_range: float | None = None  # fit answers' length (95th pct, content words); beyond: `transfer`
    transfer: Calibration | None = None  # fitted on `TRANSFER_FEATURES` only, threshold moved onto this one's
    trained_on: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION

    kind = "calibration"

    def __post_init__(self) -> None:
        n = len(self.features)
        if len(self.impute) != n or not len(self.center) == len(self.scale) == len(self.coef) == 2 * n:
            raise CalibrationError(
                f"inconsistent calibration: {n} features need {n} `impute` and {2 * n} `center`, `scale`, `coef`"
            )
        numbers = [*self.impute, *self.center, *self.scale, *self.coef, self.intercept, self.threshold]
        if not all(isinstance(x, int | float) and math.isfinite(x) for x in numbers):
            raise CalibrationError("calibration parameters must be finite numbers")

    def columns(self, vector: Features) -> list[float]:
        values, unknown = [], []
        for name, mean in zip(self.features, self.impute, strict=True):
            v = vector.get(name)
            missing = v is None or not math.isfinite(v)
            values.append(mean if missing else float(v))
            unknown.append(1.0 if missing else 0.0)
        return values + unknown

    def risk_of_vector(self, vector: Features) -> float:
        length = vector.get(LENGTH)
        if self.transfer is not None and length is not None and length > (self.length_range or math.inf):
            return self.transfer.risk_of_vector(vector)  # longer than the fit answers: length-free features only
        cols = self.columns(vector)
        z = self.intercept + sum(
            c * (x - m) / s for c, x, m, s in zip(self.coef, cols, self.center, self.scale, strict=True)
        )
        return _sigmoid(z)

    def risk(self, results: Mapping[str, DetectorResult] | Iterable[DetectorResult]) -> float:
        return self.risk_of_vector(feature_vector(results))

    def weighs(self, detector: str) -> bool:
        """Whether the risk reads `detector` at all: some column of its (its score `<name>`, a part
        `<name>.<part>`, value or unknown indicator) has a non-zero coefficient. If not, its result
        cannot move the risk, and the guard does not run it."""
        n = len(self.features)
        return any(
            (f == detector or f.startswith(f"{detector}.")) and (self.coef[i] != 0.0 or self.coef[n + i] != 0.0)
            for i, f in enumerate(self.features)
        ) or (self.transfer is not None and self.transfer.weighs(detector))

    def weights(self) -> dict[str, float]:
        """Readable weights (per standardised column), zero ones left out."""
        names = [*self.features, *(f"{f}?unknown" for f in self.features)]
        return {n: round(c, 4) for n, c in zip(names, self.coef, strict=True) if c != 0.0}

    # --- persistence -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        if not isinstance(data, Mapping):
            raise CalibrationError("a calibration must be a JSON object")
        if data.get("version") != VERSION:
            raise CalibrationError(f"calibration version {data.get('version')!r}; this tunegate reads {VERSION}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CalibrationError(f"unknown calibration field(s) {unknown}")
        if data.get("transfer") is not None:
            data = {**data, "transfer": cls.from_dict(data["transfer"])}
        try:
            return cls(**data)
        except TypeError as err:
            raise CalibrationError(f"incomplete calibration: {err}") from None

    def save(self, path: str | Path) -> Path:
        """Written atomically (a temporary file renamed), so a reader never sees half a file."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CalibrationError(f"cannot read calibration {path}: {err}") from None
        return cls.from_dict(data)

    # --- fitting -----------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        vectors: Sequence[Features],
        labels: Sequence[bool],
        C: float = 1.0,
        features: Sequence[str] | None = None,
        source: str = "",
        prune: bool = True,
        transfer: bool = True,
    ) -> Calibration:
        """Fit on feature vectors (`feature_vector(results)` per row) and hallucination labels; with
        `prune`, detectors that add no cross-validated accuracy are left out, with `transfer`, answers
        longer than the fit rows get their own regression (module docstring)."""
        if prune:
            names = list(features) if features is not None else _feature_names(vectors)
            kept, pruned = _prune(vectors, labels, C, names)
            fitted = cls.fit(vectors, labels, C, kept, source, prune=False, transfer=transfer)
            fitted.pruned = pruned
            fitted.trained_on["pruned"] = pruned
            return fitted
        import numpy as np
        from sklearn.linear_model import LogisticRegression

        if len(vectors) != len(labels):
            raise CalibrationError(f"{len(vectors)} rows but {len(labels)} labels")
        y = np.array([bool(v) for v in labels])
        if y.all() or not y.any():
            raise CalibrationError("calibration needs both hallucinated and supported rows")
        names = list(features) if features is not None else _feature_names(vectors)
        seen, unseen = [], []
        for name in names:
            known = [v[name] for v in vectors if v.get(name) is not None and math.isfinite(v[name])]
            (seen if known else unseen).append(name)
        if not seen:
            raise CalibrationError("no detector produced a score on the calibration rows (all unknown)")
        impute = []
        for name in seen:
            known = [v[name] for v in vectors if v.get(name) is not None and math.isfinite(v[name])]
            impute.append(float(np.mean(known)))
        proto = cls(seen, impute, [0.0] * 2 * len(seen), [1.0] * 2 * len(seen), [0.0] * 2 * len(seen), 0.0, 0.5)
        X = np.array([proto.columns(v) for v in vectors])  # (rows, 2 * features)
        center = X.mean(axis=0)
        scale = X.std(axis=0)
        scale[scale < 1e-12] = 1.0
        Z = (X - center) / scale
        n = len(seen)
        active = [i for i in range(2 * n) if X[:, i].std() > 1e-12]  # constant columns carry nothing
        if not active:
            raise CalibrationError("no detector score varies on the calibration rows")
        dropped: list[str] = []
        while True:
            model = LogisticRegression(C=C, class_weight="balanced", max_iter=5000)
            model.fit(Z[:, active], y)
            coef = dict(zip(active, model.coef_[0], strict=True))
            negative = [(c, i) for i, c in coef.items() if i < n and c < 0]
            if not negative:
                break
            worst = min(negative)[1]
            active.remove(worst)
            dropped.append(seen[worst])
            if not [i for i in active if i < n]:
                raise CalibrationError("every detector score lowers the risk on these rows; are labels inverted?")
        full = [float(coef.get(i, 0.0)) for i in range(2 * n)]
        fitted = cls(
            seen,
            impute,
            center.tolist(),
            scale.tolist(),
            full,
            float(model.intercept_[0]),
            0.5,
            unseen=unseen,
            dropped=dropped,
        )
        risks = np.array([fitted.risk_of_vector(v) for v in vectors])
        fitted.threshold = best_threshold(risks, y)
        fitted.trained_on = {
            "source": source,
            "rows": int(len(y)),
            "hallucinated": int(y.sum()),
            "balanced_accuracy": round(balanced_accuracy(risks >= fitted.threshold, y), 4),
            "C": C,
        }
        if transfer:
            fitted._fit_transfer(vectors, labels, C, source)
        return fitted

    def _fit_transfer(self, vectors: Sequence[Features], labels: Sequence[bool], C: float, source: str) -> None:
        """`length_range` and `transfer` (module docstring); neither where the rows give no length, are
        not extractive, or give no transfer feature that can be fitted."""
        import numpy as np

        lengths = [v[LENGTH] for v in vectors if v.get(LENGTH) is not None]
        if not lengths:
            return
        beyond = [
            v[PARAPHRASE] > 0 for v, y in zip(vectors, labels, strict=True) if not y and v.get(PARAPHRASE) is not None
        ]
        if beyond and np.mean(beyond) > EXTRACTIVE_SHARE:
            return  # these faithful answers are in their own words: the full regression has seen paraphrase
        try:
            other = Calibration.fit(vectors, labels, C, TRANSFER_FEATURES, source, prune=False, transfer=False)
        except CalibrationError:
            return
        if not other.features:
            return
        # Same decision at this calibration's threshold: risk >= threshold iff the transfer's own did.
        other.intercept += _logit(self.threshold) - _logit(other.threshold)
        other.threshold = self.threshold
        self.length_range, self.transfer = float(np.percentile(lengths, LENGTH_QUANTILE)), other
        self.trained_on["length_range"] = self.length_range


def _logit(p: float) -> float:
    p = min(1.0 - 1e-9, max(1e-9, p))
    return math.log(p / (1.0 - p))


def _feature_names(vectors: Sequence[Features]) -> list[str]:
    return sorted({k for v in vectors for k in v if k != LENGTH})


def _detector_of(feature: str) -> str:
    return feature.split(".", 1)[0]


def _cv_balanced_accuracy(vectors, y, C: float, features: list[str]) -> float:
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    predicted = np.zeros(len(y), bool)
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(np.zeros(len(y)), y):
        try:
            model = Calibration.fit([vectors[i] for i in train], y[train].tolist(), C, features, prune=False)
        except CalibrationError:
            return 0.0
        predicted[test] = [model.risk_of_vector(vectors[i]) >= model.threshold for i in test]
    return balanced_accuracy(predicted, y)


def _prune(vectors, labels, C: float, names: list[str]) -> tuple[list[str], list[str]]:
    """(features kept, detectors pruned): backward elimination of whole detectors by cross-validated
    balanced accuracy, the cheapest loss first, while within `PRUNE_TOLERANCE` of the best reached."""
    import numpy as np

    y = np.array([bool(v) for v in labels])
    known = {n for n in names if any(v.get(n) is not None and math.isfinite(v[n]) for v in vectors)}
    detectors = list(dict.fromkeys(_detector_of(n) for n in names if n in known))  # never known: `unseen`
    if len(y) < PRUNE_MIN_ROWS or min(y.sum(), (~y).sum()) < 10 or len(detectors) < 2:
        return names, []
    best = _cv_balanced_accuracy(vectors, y, C, names)
    pruned: list[str] = []
    while len(detectors) > 1:
        trials = {}
        for d in detectors:
            without = [n for n in names if _detector_of(n) not in {*pruned, d}]
            trials[d] = _cv_balanced_accuracy(vectors, y, C, without)
        candidate = max(detectors, key=lambda d: trials[d])
        if trials[candidate] < best - PRUNE_TOLERANCE:
            break
        best = max(best, trials[candidate])
        pruned.append(candidate)
        detectors.remove(candidate)
    return [n for n in names if _detector_of(n) not in pruned], pruned


@dataclass
class DefaultCombination:
    """Used when no calibration file exists: a weighted mean of the known detector scores.

    Weights: grounding, nli and judge 0.6 each (they check the answer against evidence),
    consistency 0.3, uncertainty 0.25, embedding 0.15 (similar is not the same as supported), any
    other detector 0.1. A detector given weight 0 is not run by the guard.
    Unknown scores are left out of the mean; with no known score the risk is 0.5 ("no evidence
    either way"), which the default policy annotates. `threshold` 0.5.
    """

    weights: dict[str, float] = field(
        default_factory=lambda: {
            "grounding": 0.6,
            "nli": 0.6,
            "judge": 0.6,
            "consistency": 0.3,
            "uncertainty": 0.25,
            "embedding": 0.15,
        }
    )
    threshold: float = 0.5
    no_evidence_risk: float = 0.5

    kind = "default"

    def weight(self, detector: str) -> float:
        return self.weights.get(detector, OTHER_WEIGHT)

    def weighs(self, detector: str) -> bool:
        return self.weight(detector) != 0.0

    def risk(self, results: Mapping[str, DetectorResult] | Iterable[DetectorResult]) -> float:
        items = results.values() if isinstance(results, Mapping) else results
        known = [(self.weight(r.name), r.score) for r in items if r.score is not None]
        total = sum(w for w, _ in known)
        if not known or total <= 0:
            return self.no_evidence_risk
        return min(1.0, max(0.0, sum(w * s for w, s in known) / total))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


RiskModel = Calibration | DefaultCombination


def balanced_accuracy(predicted, labels) -> float:
    import numpy as np

    p, y = np.asarray(predicted, bool), np.asarray(labels, bool)
    tpr = (p & y).sum() / max(y.sum(), 1)
    tnr = (~p & ~y).sum() / max((~y).sum(), 1)
    return float((tpr + tnr) / 2)


def best_threshold(risks, labels) -> float:
    """The threshold (flag when risk >= it) with the best balanced accuracy: the middle of the range
    of thresholds that reach it, so a clean gap between the classes is split in half."""
    import numpy as np

    r, y = np.asarray(risks, float), np.asarray(labels, bool)
    u = np.unique(r)
    candidates = np.concatenate([[u[0] - 1e-6], (u[:-1] + u[1:]) / 2, [u[-1] + 1e-6]])
    scores = np.array([balanced_accuracy(r >= t, y) for t in candidates])
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    lo, hi = candidates[best[0]], candidates[best[-1]]
    if best[-1] - best[0] + 1 == len(best):  # one contiguous range: its midpoint
        return float(min(1.0, max(0.0, (lo + hi) / 2)))
    return float(min(1.0, max(0.0, candidates[best[len(best) // 2]])))


# --- labelled rows ---------------------------------------------------------------------------------

_VERDICT_LABELS = {"approve": False, "approved": False, "reject": True, "rejected": True, "edit": True, "edited": True}


def read_labelled(path: str | Path) -> list[dict[str, Any]]:
    """Rows `{knowledge, question, answer, hallucinated}` from a JSONL file (HaluEval QA's format)."""
    rows = []
    for lineno, row in read_jsonl(path, CalibrationError):
        missing = [k for k in ("question", "answer", "hallucinated") if k not in row]
        if missing:
            raise CalibrationError(
                f"{path}:{lineno}: missing field(s) {missing}; rows need knowledge, question, answer, hallucinated"
            )
        if not isinstance(row["hallucinated"], bool):
            raise CalibrationError(f"{path}:{lineno}: `hallucinated` must be true or false")
        rows.append(row)
    if not rows:
        raise CalibrationError(f"{path} has no rows")
    return rows


def rows_from_reviews(reviews: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Labelled rows from reviewer verdicts: approve -> not hallucinated; reject or edit -> hallucinated.

    Each review is `{question, context, answer, verdict}`, optionally with the answer's
    `token_logprobs`, `top_logprobs` and `samples` (kept, so those detectors get calibrated too). A
    `corrected_answer` of an edit also becomes a supported row (written against the same context)."""
    rows = []
    for i, review in enumerate(reviews):
        verdict = str(review.get("verdict", "")).lower()
        if verdict not in _VERDICT_LABELS:
            raise CalibrationError(f"review {i}: `verdict` {review.get('verdict')!r} is not approve, reject or edit")
        context = review.get("context") or review.get("knowledge") or ""
        row = {
            "knowledge": context,
            "question": review.get("question", ""),
            "answer": review.get("answer", ""),
            "hallucinated": _VERDICT_LABELS[verdict],
        }
        # What the gateway stored about how the answer was produced: the uncertainty and consistency
        # detectors can only be calibrated on rows that carry it.
        row.update({k: review[k] for k in ("token_logprobs", "top_logprobs", "samples") if review.get(k)})
        rows.append(row)
        corrected = review.get("corrected_answer")
        if verdict.startswith("edit") and isinstance(corrected, str) and corrected.strip():
            rows.append({"knowledge": context, "question": review.get("question", ""), "answer": corrected,
                         "hallucinated": False})  # fmt: skip
    return rows
