"""The architecture as checks: the import layers (import-linter), a docstring that says what each
package owns, and modules a reader can hold (at most 500 lines in the product packages)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ["core", "guardrails", "training", "evalsuite", "gateway", "bench", "tunegate"]


def test_import_layers_hold():
    """`lint-imports` checks the contracts in pyproject.toml: tunegate -> bench -> gateway | training |
    evalsuite -> guardrails -> core, nothing but the wiring and bench imports the gateway."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    """The check is live: a core module that imports the gateway is reported (on a copy of the tree)."""
    import shutil

    for name in PRODUCT:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "core" / "upward.py").write_text('"""A bad module."""\nimport gateway.errors  # noqa: F401\n')
    lint = Path(sys.executable).with_name("lint-imports")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "core.upward" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("package", PRODUCT)
def test_each_package_says_what_it_owns_and_may_import(package):
    doc = ast.get_docstring(ast.parse((REPO / package / "__init__.py").read_text()))
    assert doc and "import" in doc.lower(), f"{package}/__init__.py must say what it owns and what it may import"


def test_every_module_has_a_docstring_and_at_most_500_lines():
    too_long, undocumented = [], []
    for package in PRODUCT:
        for path in (REPO / package).rglob("*.py"):
            if "migrations/versions" in path.as_posix():
                continue
            text = path.read_text()
            if text.count("\n") > 500:
                too_long.append(f"{path.relative_to(REPO)} ({text.count(chr(10))} lines)")
            if not ast.get_docstring(ast.parse(text)) and text.strip():
                undocumented.append(str(path.relative_to(REPO)))
    assert not too_long, f"modules over 500 lines: {too_long}"
    assert not undocumented, f"modules without a docstring: {undocumented}"
