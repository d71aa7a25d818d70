"""The gateway takes a calibration the eval suite re-fitted without a restart, and keeps its guard when the
new file is broken (`gateway.guarding.GuardService.reload_if_changed`, run by each replica's housekeeping)."""

from __future__ import annotations

import os

from core.settings import load_settings
from gateway.guarding import GuardService
from guardrails.calibration import Calibration


def calibration(weight: float, threshold: float) -> Calibration:
    """A calibration over the grounding detector alone (no model to load), `weight` on its score."""
    return Calibration(
        features=["grounding"], impute=[0.5], center=[0.0, 0.0], scale=[1.0, 1.0], coef=[weight, 0.0],
        intercept=0.0, threshold=threshold,
    )  # fmt: skip


def test_a_refitted_calibration_is_taken_and_a_broken_one_is_not(tmp_path):
    settings = load_settings(var_dir=tmp_path, guardrails={"detectors": ["grounding"]})
    service = GuardService(settings)
    path = service.calibration_path
    assert not path.exists() and service.reload_if_changed() is False  # nothing to take yet

    calibration(2.0, 0.4).save(path)
    assert service.reload_if_changed() is True
    first = service.guard
    assert first.risk_model.threshold == 0.4 and first.active == ("grounding",)
    assert service.reload_if_changed() is False  # unchanged file: the same guard, nothing rebuilt
    assert service.guard is first

    calibration(3.0, 0.6).save(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))  # a new stamp, surely
    assert service.reload_if_changed() is True
    assert service.guard is not first and service.guard.risk_model.threshold == 0.6

    working = service.guard
    path.write_text("{not json")
    assert service.reload_if_changed() is False  # broken: logged, the current guard stays
    assert service.guard is working


def test_guardrails_off_never_reload(tmp_path):
    settings = load_settings(var_dir=tmp_path, guardrails={"enabled": False})
    service = GuardService(settings)
    calibration(2.0, 0.4).save(service.calibration_path)
    assert service.reload_if_changed() is False and service.guard is None
