"""In CI (`CI=true`) a missing service fails the run; on a developer's machine it skips the test.

Run on a throwaway test file in a subprocess, with PostgreSQL pointed at a port where nothing listens."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from core.io import free_port

from .conftest import REPO

PROBE = """
def test_needs_postgres(postgres_database):
    assert postgres_database
"""


@pytest.mark.parametrize(("ci", "outcome"), [("true", r"1 (failed|error)"), ("", r"1 skipped")])
def test_a_missing_postgres_fails_in_ci_and_skips_elsewhere(tmp_path, monkeypatch, ci, outcome):
    probe = REPO / "tests" / f"test_probe_{tmp_path.name}.py"
    probe.write_text(PROBE)
    try:
        env = {"CI": ci, "TUNEGATE_TEST_POSTGRES_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/none",
               "PATH": "/usr/bin:/bin"}  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        probe.unlink()
    assert re.search(outcome, result.stdout), result.stdout[-2000:]  # a failing fixture is an error of its test
    assert (result.returncode != 0) == bool(ci)
    if ci:
        assert "CI=true: a missing service fails the run" in result.stdout
