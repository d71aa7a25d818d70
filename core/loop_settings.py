"""The closed loop's settings section (`loop:` in `tunegate.yaml`): scoring, review budget, test sets,
drift, triggers, the gate, the canary and the guard's re-fit. Part of `core.settings` (which imports
it); kept apart only so each file stays one screenful of a reader's attention.

Imports pydantic only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TriggerSettings(_Section):
    """When the loop files a training job for a route. Any one condition fires it, within the limits."""

    min_new_labels: int = Field(50, ge=1, description="Reviewed labels since the last training that fire a retrain.")
    quality_below: float = Field(0.7, ge=0, le=1, description="Online quality of the active version below this fires.")
    min_scored_for_quality: int = Field(30, ge=1, description="Scored exchanges the quality trigger needs.")
    on_drift: bool = Field(True, description="Input drift (domain classifier) fires a retrain.")
    cooldown_s: float = Field(3600.0, ge=0, description="Least time between two trainings of a route.")
    max_per_day: int = Field(4, ge=1, description="Most trainings of a route per UTC day.")


class GateSettings(_Section):
    """A candidate must beat the active version on the test set and not lose on the holdout."""

    alpha: float = Field(0.05, gt=0, lt=1, description="Level of the one-sided paired test on the test set.")
    power: float = Field(0.8, gt=0, lt=1, description="Power the item count must reach for `min_effect`.")
    min_effect: float = Field(0.1, gt=0, le=1, description="Smallest accuracy gain worth detecting.")
    expected_discordance: float = Field(
        0.2, gt=0, le=1, description="Assumed share of items the two versions disagree on (power calculation)."
    )
    holdout_margin: float = Field(0.05, gt=0, lt=1, description="How much worse on the holdout still passes.")
    method: str = Field("mcnemar", description="`mcnemar` (exact) or `bootstrap` (paired) on the test set.")

    @field_validator("method")
    @classmethod
    def _known(cls, method: str) -> str:
        if method not in ("mcnemar", "bootstrap"):
            raise ValueError("use `mcnemar` or `bootstrap`")
        return method


class CanarySettings(_Section):
    """Traffic steps of a gated candidate; each is compared with the active version on the same window."""

    steps: list[float] = Field(default_factory=lambda: [0.1, 0.5, 1.0], description="The canary's share per step.")
    step_requests: int = Field(50, ge=1, description="Canary requests a step needs before it is judged.")
    step_seconds: float | None = Field(None, gt=0, description="Or judge a step after this long (whichever first).")
    alpha: float = Field(0.01, gt=0, lt=1, description="A canary worse than active at this level fails the step.")
    max_latency_ratio: float = Field(1.5, gt=1, description="Canary p95 latency over active's p95 that fails.")
    max_failures: int = Field(1, ge=1, description="Failed steps that roll the canary back.")

    @field_validator("steps")
    @classmethod
    def _rising_to_one(cls, steps: list[float]) -> list[float]:
        if not steps or any(not 0 < s <= 1 for s in steps) or steps != sorted(steps) or steps[-1] != 1.0:
            raise ValueError("steps must rise within (0, 1] and end at 1.0, e.g. [0.1, 0.5, 1.0]")
        return steps


class DriftSettings(_Section):
    reference_size: int = Field(200, ge=10, description="Exchanges in the reference window (the oldest scored).")
    window_size: int = Field(200, ge=10, description="Exchanges in the current window (the newest scored).")
    p_value: float = Field(0.05, gt=0, lt=1, description="KS / Fisher level for small windows.")
    wasserstein: float = Field(0.1, gt=0, description="Normalised Wasserstein distance that is drift (large windows).")
    psi: float = Field(0.1, gt=0, description="PSI reported beside (Evidently's threshold).")
    auroc: float = Field(0.75, gt=0.5, lt=1, description="Domain classifier ROC AUC above which inputs drifted.")


class LoopSettings(_Section):
    """The eval suite and the closed loop."""

    enabled: bool = Field(True, description="Workers run the loop's jobs (score, drift, trigger, gate, canary).")
    window_s: float = Field(300.0, gt=0, description="Length of a scoring window.")
    score_sample_rate: float = Field(0.2, ge=0, le=1, description="Share of live exchanges a worker scores.")
    review_budget_per_day: int = Field(200, ge=0, description="Priority review items per route and UTC day.")
    near_threshold: float = Field(0.15, ge=0, le=1, description="Risk this close below `hold_at` is worth a look.")
    holdout_size: int = Field(40, ge=1, description="Reviewed items in the frozen holdout (it never grows after).")
    test_share: float = Field(0.25, ge=0, lt=1, description="Share of later reviewed items that join the test set.")
    replay_rows: int = Field(300, ge=0, description="Rows of the current model's training data replayed.")
    agreement_below: float = Field(0.8, ge=0, le=1, description="Guard-reviewer agreement that re-fits the guard.")
    agreement_min_items: int = Field(30, ge=1, description="Reviewed items agreement needs.")
    train_max_steps: int = Field(300, ge=1, description="Training steps of a loop-filed training job.")
    train_learning_rate: float = Field(2e-3, gt=0, description="Peak learning rate of a loop-filed training job.")
    interval_s: float = Field(10.0, gt=0, description="How often a worker looks for work when idle.")
    trigger: TriggerSettings = Field(default_factory=TriggerSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    canary: CanarySettings = Field(default_factory=CanarySettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
