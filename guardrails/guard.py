"""The guard: run the detectors the risk model reads on one answer and combine them into one risk.

Owns `Guard` (the risk model from a calibration file or the documented default combination, then
the detectors from the registry) and `RiskReport` (risk, per-detector results, skipped detectors,
time taken). It decides nothing: the route's policy (`guardrails.policy.decide`) maps the risk to an
action. Imports `core.settings` and `guardrails.*`.

The plan runs only what counts: a configured detector the risk model gives no weight (a calibration
whose coefficients for all its columns are 0, or a default-combination weight of 0) is neither built
nor run. It is listed in `RiskReport.skipped` and absent from `results`; the risk is exactly what the
full run gives, since its columns contributed nothing. The gateway plans a request from three cheap
properties: `Guard.active` (the detectors that run), `Guard.needs_logprobs` (ask vLLM for logprobs)
and `Guard.needs_samples` (ask for `guardrails.consistency_samples` extra samples).

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
from guardrails.types import LOGPROB_FIELDS, CheckInput, Detector, DetectorResult, fields_read


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
    skipped: tuple[str, ...] = ()  # configured, but not run: the risk model gives them no weight

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
            "skipped": list(self.skipped),
            "results": {name: r.to_dict() for name, r in self.results.items()},
        }


def run_detectors(detectors: Mapping[str, Detector], inp: CheckInput) -> dict[str, DetectorResult]:
    """Every detector's result by name; one that raises is "unknown" with the error as evidence."""
    results = {}
    for name, detector in detectors.items():
        try:
            result = detector(inp)
        except Exception as err:  # noqa: BLE001 - one broken detector must not fail the request
            result = DetectorResult.unknown(name, f"detector failed: {type(err).__name__}: {err}")
        if result.name != name:
            result = DetectorResult(name, result.score, result.evidence, result.unsupported_spans)
        results[name] = result
    return results


class Guard:
    """`Guard(settings, calibration_path).check(CheckInput) -> RiskReport`.

    `detectors` and `risk_model` replace the registry's detectors and the calibration file (tests,
    benchmarks). `only_weighted=False` runs every configured detector, weighted or not (the
    benchmark's comparison run)."""

    def __init__(
        self,
        settings: GuardrailSettings | None = None,
        calibration_path: str | Path | None = None,
        *,
        detectors: Mapping[str, Detector] | None = None,
        risk_model: RiskModel | None = None,
        only_weighted: bool = True,
    ) -> None:
        self.settings = settings or GuardrailSettings()
        path = calibration_path if calibration_path is not None else self.settings.calibration_path
        if risk_model is not None:
            self.risk_model: RiskModel = risk_model
        elif path is not None and Path(path).exists():
            self.risk_model = Calibration.load(path)  # a broken file is an error at start, not a silent default
        else:
            self.risk_model = DefaultCombination()
        configured = list(detectors) if detectors is not None else list(self.settings.detectors)
        active = [n for n in configured if not only_weighted or self.risk_model.weighs(n)]
        self.skipped: tuple[str, ...] = tuple(n for n in configured if n not in active)
        self.detectors: dict[str, Detector] = (
            {n: detectors[n] for n in active} if detectors is not None else build_detectors(self.settings, only=active)
        )
        read = frozenset().union(*(fields_read(d) for d in self.detectors.values()))
        self._needs_logprobs = bool(read & LOGPROB_FIELDS)
        self._needs_samples = "samples" in read

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the detectors that run, in the configured order."""
        return tuple(self.detectors)

    @property
    def needs_logprobs(self) -> bool:
        """An active detector reads the answer's token logprobs (ask vLLM for `logprobs`)."""
        return self._needs_logprobs

    @property
    def needs_samples(self) -> bool:
        """An active detector reads extra samples (ask vLLM for `guardrails.consistency_samples` of them)."""
        return self._needs_samples

    def run_detectors(self, inp: CheckInput) -> dict[str, DetectorResult]:
        return run_detectors(self.detectors, inp)

    def clear_caches(self) -> None:
        """Forget what the detectors cached (passages seen): the next checks start cold."""
        for detector in self.detectors.values():
            clear = getattr(detector, "clear_cache", None)
            if callable(clear):
                clear()

    def check(self, inp: CheckInput) -> RiskReport:
        start = time.perf_counter()
        results = self.run_detectors(inp)
        risk = self.risk_model.risk(results)
        return RiskReport(risk, results, (time.perf_counter() - start) * 1000, self.skipped)


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

    vectors = [feature_vector(run_detectors(detectors, check_input(r))) for r in rows]
    return Calibration.fit(vectors, [bool(r["hallucinated"]) for r in rows], C=C, source=source)
