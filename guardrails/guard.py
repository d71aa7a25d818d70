"""The guard: run the configured detectors on one answer and combine them into one calibrated risk.

Owns `Guard` (detectors from the registry, the risk model from a calibration file or the documented
default combination) and `RiskReport` (risk, per-detector results, time taken). It decides nothing: the
route's policy (`guardrails.policy.decide`) maps the risk to an action. Imports `core.settings` and
`guardrails.*`.

A detector that raises does not fail the check: its result is "unknown" with the error as evidence,
and the risk model treats it as such (an unknown is never a pass).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.settings import GuardrailSettings
from guardrails.calibration import Calibration, DefaultCombination, RiskModel
from guardrails.registry import build_detectors
from guardrails.types import CheckInput, Detector, DetectorResult


def calibration_path_for(settings: GuardrailSettings, var_dir: str | Path) -> Path:
    """`guardrails.calibration_path`, or its documented default `<var_dir>/guardrails/calibration.json`."""
    if settings.calibration_path:
        return Path(settings.calibration_path)
    return Path(var_dir) / "guardrails" / "calibration.json"


@dataclass(frozen=True)
class RiskReport:
    """The risk in [0, 1], what each detector found, and how long the whole check took."""

    risk: float
    results: dict[str, DetectorResult]
    total_ms: float

    @property
    def unknown(self) -> list[str]:
        return [name for name, r in self.results.items() if r.score is None]

    def unsupported_spans(self) -> list[tuple[int, int]]:
        return sorted({s for r in self.results.values() for s in r.unsupported_spans})

    def to_dict(self) -> dict[str, Any]:
        return {
            "risk": round(self.risk, 6),
            "total_ms": round(self.total_ms, 3),
            "unknown": self.unknown,
            "results": {name: r.to_dict() for name, r in self.results.items()},
        }


class Guard:
    """`Guard(settings, calibration_path).check(CheckInput) -> RiskReport`."""

    def __init__(
        self,
        settings: GuardrailSettings | None = None,
        calibration_path: str | Path | None = None,
        *,
        detectors: Mapping[str, Detector] | None = None,
        risk_model: RiskModel | None = None,
    ) -> None:
        self.settings = settings or GuardrailSettings()
        self.detectors: dict[str, Detector] = (
            dict(detectors) if detectors is not None else build_detectors(self.settings)
        )
        path = calibration_path if calibration_path is not None else self.settings.calibration_path
        if risk_model is not None:
            self.risk_model: RiskModel = risk_model
        elif path is not None and Path(path).exists():
            self.risk_model = Calibration.load(path)  # a broken file is an error at start, not a silent default
        else:
            self.risk_model = DefaultCombination()

    def run_detectors(self, inp: CheckInput) -> dict[str, DetectorResult]:
        results = {}
        for name, detector in self.detectors.items():
            try:
                result = detector(inp)
            except Exception as err:  # noqa: BLE001 - one broken detector must not fail the request
                result = DetectorResult.unknown(name, f"detector failed: {type(err).__name__}: {err}")
            if result.name != name:
                result = DetectorResult(name, result.score, result.evidence, result.unsupported_spans)
            results[name] = result
        return results

    def check(self, inp: CheckInput) -> RiskReport:
        start = time.perf_counter()
        results = self.run_detectors(inp)
        risk = self.risk_model.risk(results)
        return RiskReport(risk, results, (time.perf_counter() - start) * 1000)


def check_input(row: Mapping[str, Any]) -> CheckInput:
    """A labelled row (`knowledge`/`context`, `question`, `answer`, optional logprobs and samples) as input."""
    return CheckInput(
        question=str(row.get("question", "")),
        answer=str(row.get("answer", "")),
        context=row.get("knowledge", row.get("context")),
        token_logprobs=row.get("token_logprobs"),
        top_logprobs=row.get("top_logprobs"),
        samples=list(row.get("samples") or []),
    )


def fit_calibration(
    rows: list[Mapping[str, Any]], detectors: Mapping[str, Detector], C: float = 1.0, source: str = ""
) -> Calibration:
    """Run the detectors on labelled rows and fit the calibrated risk on their results."""
    from guardrails.calibration import feature_vector

    guard = Guard(detectors=detectors, risk_model=DefaultCombination())
    vectors = [feature_vector(guard.run_detectors(check_input(r))) for r in rows]
    return Calibration.fit(vectors, [bool(r["hallucinated"]) for r in rows], C=C, source=source)
