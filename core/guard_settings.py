"""The guardrails' settings section (`guardrails:` in `tunegate.yaml`): detectors, calibration, the
learned grounding model, the judge, and the default policy. Part of `core.settings` (which imports
and re-exports it); kept apart only so each file stays one screenful of a reader's attention.

Imports pydantic only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

_SECRET: dict[str, Any] = {"secret": "value"}  # the marker `core.settings.secret_kind` reads: shown as ***


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PolicySettings(_Section):
    """Risk thresholds: below `annotate_at` allow; then annotate; from `hold_at` hold for review;
    from `block_at` block. A threshold above 1 switches that action off."""

    annotate_at: float = Field(0.4, ge=0, description="Risk from which the answer carries its risk and evidence.")
    hold_at: float = Field(0.75, ge=0, description="Risk from which the answer waits for a reviewer (202).")
    block_at: float = Field(1.01, ge=0, description="Risk from which the answer is refused outright.")

    @model_validator(mode="after")
    def _ordered(self) -> PolicySettings:
        if not self.annotate_at <= self.hold_at <= self.block_at:
            raise ValueError("thresholds must satisfy `annotate_at` <= `hold_at` <= `block_at`")
        return self


class GuardrailSettings(_Section):
    enabled: bool = Field(True, description="Score answers and apply the route's policy.")
    detectors: list[str] = Field(
        default_factory=lambda: ["grounding", "embedding", "uncertainty", "grounding_model"],
        description="Detectors to run, by registry name (`grounding_model` runs once it is built).",
    )
    calibration_path: Path | None = Field(
        None,
        description="Fitted risk model (`tunegate guard calibrate`); default `<var_dir>/guardrails/calibration.json`.",
    )
    nli_model_path: Path | None = Field(None, description="Local folder of an NLI / hallucination classifier.")
    grounding_model_path: Path | None = Field(None, description="Learned grounding model; default: the last built.")
    check_budget_ms: float | None = Field(250.0, gt=0, description="Grounding model's budget per check, then unknown.")
    judge_url: str | None = Field(
        None, repr=False, description="OpenAI-compatible endpoint of an LLM judge (password, key masked)."
    )
    judge_model: str | None = Field(None, description="Model name the judge endpoint serves.")
    judge_api_key: str | None = Field(
        None, repr=False, json_schema_extra=_SECRET, description="Key for the judge endpoint (a secret)."
    )
    consistency_samples: int = Field(0, ge=0, le=8, description="Extra samples asked of vLLM for self-consistency.")
    policy: PolicySettings = Field(default_factory=PolicySettings, description="Policy of routes without their own.")
