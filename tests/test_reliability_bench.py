"""`tunegate bench reliability`: one JSON object with the agreed fields, a plot, and a soak summary
that compares the first window with the last. A few seconds of soak; the faults themselves are
`tests/test_faults.py`'s (here only the cheap ones run); shapes are checked, never timings."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bench import faults, reliability
from bench.soak import soak_summary
from tunegate.cli import app

FIELDS = {
    "fuzz_cases", "hostile_cases", "server_errors", "stalls", "faults", "lost_records", "authz_violations",
    "soak_errors", "soak_rss_growth", "soak_p99_ms_first", "soak_p99_ms_last",
}  # fmt: skip


def test_the_command_prints_one_json_object_and_writes_a_plot(tmp_path, monkeypatch):
    cheap = {"worker_lease": faults.worker_lease(tmp_path / "w"), "registry_enospc": faults.registry_enospc(tmp_path)}
    monkeypatch.setattr(reliability, "run_faults", lambda work, outage_s, postgres: cheap)
    out = tmp_path / "out"
    args = ["bench", "reliability", "--json", "--out", str(out), "--soak-minutes", "0.05", "--soak-rate", "4"]
    result = CliRunner().invoke(app, [*args, "--no-postgres"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert FIELDS <= set(summary)
    assert summary["fuzz_cases"] is None and "fuzz" in summary["fuzz_note"]
    assert summary["hostile_cases"] > 10 and summary["authz_violations"] == 0 and summary["stalls"] == 0
    assert summary["faults"]["worker_lease"] == "survived" and summary["faults"]["registry_enospc"] == "survived"
    assert summary["faults"]["postgres_outage"].startswith("not run")
    assert "tests/test_training.py" in summary["faults"]["training_killed"]
    assert summary["lost_records"] == 0
    assert summary["soak_requests"] > 0 and summary["soak_errors"] == 0
    assert isinstance(summary["soak_rss_growth"], float)
    assert summary["soak_p99_ms_first"] > 0 and summary["soak_p99_ms_last"] > 0
    assert (out / "reliability.png").stat().st_size > 0
    assert json.loads((out / "reliability.json").read_text())["faults"] == summary["faults"]


def test_the_summary_compares_the_first_window_with_the_last():
    requests = [(i / 10, 10.0 if i < 200 else 30.0, 200) for i in range(600)] + [(59.0, 5.0, 0)]
    rss = [(float(s), (100 if s < 30 else 110) * 2**20) for s in range(61)]
    summary = soak_summary({"seconds": 60.0, "requests": sorted(requests), "rss": rss, "rate": 10})
    assert summary["soak_window_s"] == 12.0
    assert summary["soak_errors"] == 1 and summary["soak_requests"] == 601
    assert summary["soak_p99_ms_first"] == 10.0 and summary["soak_p99_ms_last"] == 30.0
    assert summary["soak_p99_ratio"] == 3.0
    assert summary["soak_rss_growth"] == pytest.approx(0.1)


def test_bad_settings_are_refused():
    result = CliRunner().invoke(app, ["bench", "reliability", "--soak-minutes", "0"])
    assert result.exit_code != 0 and "soak-minutes" in result.output
