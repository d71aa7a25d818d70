"""`tunegate loop | evals | report | worker` through the command line (typer's CliRunner on SQLite), with a
settings file written per test and passed as `--config`.

No vLLM: the routes have no traffic and no candidates, so a pass never calls the server; the worker's
URL points at a port nothing listens on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from click.testing import Result
from typer.testing import CliRunner

from core.db import AuditLog, Job, make_engine, session_factory, session_scope, upgrade
from core.io import read_jsonl
from core.settings import load_settings
from core.vocab import DatasetKind, JobStatus
from evalsuite import testsets
from tunegate.cli import app
from tunegate.loop import PASS_JOB

from .test_testsets import add_reviewed, answer_of, question, questions_on

NOWHERE = "http://127.0.0.1:9"
HOLDOUT, TEST_SHARE = 2, 0.5


@pytest.fixture(autouse=True)
def _no_machine_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the test's file counts: no vLLM URL or config file from the environment."""
    for name in list(os.environ):
        if name.startswith("TUNEGATE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tunegate.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "var_dir": str(tmp_path / "var"),
                "database": {"url": f"sqlite:///{tmp_path / 'var' / 'tunegate.db'}"},
                "routes": {
                    "support": {"targets": [{"adapter": None}]},
                    "billing": {"targets": [{"adapter": None}]},
                },
                "loop": {"interval_s": 30, "holdout_size": HOLDOUT, "test_share": TEST_SHARE},
            }
        )
    )
    return path


@pytest.fixture
def sessions(config: Path):
    settings = load_settings(config)
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    yield session_factory(engine)
    engine.dispose()


def cli(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result: Result) -> dict:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return json.loads(result.stdout)


@pytest.fixture
def reviewed(config: Path, sessions) -> dict[str, list[testsets.TestItem]]:
    """The `support` route with reviewed answers split (holdout first, then test set and training)."""
    settings = load_settings(config)
    tests = questions_on(True, TEST_SHARE, 100, 3)
    train = questions_on(False, TEST_SHARE, 100, 2)
    with session_scope(sessions) as session:
        for i in [0, 1, *tests, *train]:  # the first two fill the holdout
            add_reviewed(session, question(i), answer_of(i), route="support")
        assignment = testsets.assign_reviewed(session, "support", settings.loop)
        assert (assignment.holdout, assignment.test, assignment.train) == (HOLDOUT, 3, 2)
    with sessions() as session:
        return {
            "test": testsets.items(session, "support", DatasetKind.TEST),
            "holdout": testsets.items(session, "support", DatasetKind.HOLDOUT),
        }


def test_status_pause_resume(config: Path, sessions) -> None:
    status = ok(cli("loop", "status", "--config", config, "--json"))
    assert set(status) == {"billing", "support", "_jobs"}
    for route in ("billing", "support"):
        assert status[route]["paused"] is False
        assert status[route]["targets"] == [{"version": "base", "status": "active", "weight": 1.0}]
        assert status[route]["test_set_version"] is None and status[route]["test_items"] == 0

    paused = cli("loop", "pause", "--config", config, "--route", "support", "--reason", "x")
    assert paused.exit_code == 0, paused.output
    status = ok(cli("loop", "status", "--config", config, "--json"))
    assert status["support"]["paused"] is True and status["billing"]["paused"] is False
    with sessions() as session:
        rows = session.scalars(sa.select(AuditLog).where(AuditLog.action == "loop.paused")).all()
        assert [(r.object_id, r.actor, r.detail) for r in rows] == [("support", "cli", {"reason": "x"})]

    resumed = cli("loop", "resume", "--config", config, "--route", "support")
    assert resumed.exit_code == 0, resumed.output
    status = ok(cli("loop", "status", "--config", config, "--json"))
    assert status["support"]["paused"] is False
    with sessions() as session:
        assert session.scalar(sa.select(sa.func.count()).where(AuditLog.action == "loop.resumed")) == 1

    unknown = cli("loop", "pause", "--config", config, "--route", "nope", "--reason", "x")
    assert unknown.exit_code == 2
    assert "no route `nope`" in unknown.stderr and "Traceback" not in unknown.output
    with sessions() as session:
        assert session.scalar(sa.select(sa.func.count()).where(AuditLog.object_id == "nope")) == 0


def test_evals_export_writes_the_test_set_and_the_holdout(config: Path, reviewed, tmp_path: Path) -> None:
    out = tmp_path / "task"
    found = ok(cli("evals", "export", "support", "--out", out, "--config", config, "--json"))
    assert found["task"] == "tunegate_support_test" and found["rows"] == 3
    assert Path(found["yaml"]) == (out / "tunegate_support_test.yaml").resolve() and Path(found["yaml"]).is_file()
    docs = [row for _, row in read_jsonl(Path(found["jsonl"]))]
    assert {d["id"] for d in docs} == {str(i.example_id) for i in reviewed["test"]}
    assert {d["answer"] for d in docs} == {i.answer for i in reviewed["test"]}
    task = yaml.safe_load(Path(found["yaml"]).read_text())
    assert task["task"] == "tunegate_support_test"
    command = found["command"]
    assert command.startswith("OPENAI_API_KEY=")
    assert "--model local-chat-completions" in command and "model=support" in command
    assert "--tasks tunegate_support_test" in command

    holdout = ok(
        cli("evals", "export", "support", "--kind", "holdout", "--out", tmp_path / "h", "--config", config, "--json")
    )
    assert holdout["task"] == "tunegate_support_holdout" and holdout["rows"] == HOLDOUT
    docs = [row for _, row in read_jsonl(Path(holdout["jsonl"]))]
    assert {d["id"] for d in docs} == {str(i.example_id) for i in reviewed["holdout"]}

    empty = cli("evals", "export", "billing", "--out", tmp_path / "b", "--config", config, "--json")
    assert empty.exit_code == 2 and empty.stdout == ""
    assert "route `billing` has no test items" in empty.stderr
    assert not (tmp_path / "b").exists()

    bad = cli("evals", "export", "support", "--kind", "train", "--out", tmp_path / "x", "--config", config)
    assert bad.exit_code == 2 and "`--kind` is `test` or `holdout`" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_report_writes_html_and_json(config: Path, reviewed, tmp_path: Path) -> None:
    out = tmp_path / "report"
    found = ok(cli("report", "--out", out, "--config", config, "--json"))
    assert Path(found["html"]) == out / "index.html"
    assert (out / "index.html").read_text().lstrip().lower().startswith("<!doctype html")
    # The summary's own `plots` (file names in the folder) is what --json prints under `plots`.
    assert json.loads((out / "report.json").read_text()) == {k: v for k, v in found.items() if k != "html"}
    assert all((out / name).is_file() for name in found["plots"])


def test_worker_once_and_run_once(config: Path, sessions) -> None:
    done = cli("worker", "--once", "--vllm-url", NOWHERE, "--config", config)
    assert done.exit_code == 0, done.output
    with sessions() as session:
        passes = session.scalars(sa.select(Job).where(Job.kind == PASS_JOB)).all()
    succeeded = sorted(j.payload["route"] for j in passes if j.status == JobStatus.SUCCEEDED)
    assert succeeded == ["billing", "support"]
    assert sorted(j.payload["route"] for j in passes if j.status == JobStatus.QUEUED) == ["billing", "support"]

    # run-once forces the queued passes (not due for interval_s) and prints what they found.
    found = ok(cli("loop", "run-once", "--vllm-url", NOWHERE, "--config", config, "--json"))
    assert found["train"] == [] and "errors" not in found
    for route in ("billing", "support"):
        assert found[f"{route}.gate"] == [] and found[f"{route}.canary"] == []
        assert found[f"{route}.trigger"]["fire"] is False
        assert f"{route}.assign" in found and f"{route}.prioritise" in found
    with sessions() as session:
        count = session.scalar(
            sa.select(sa.func.count()).where(Job.kind == PASS_JOB, Job.status == JobStatus.SUCCEEDED)
        )
    assert count == 4

    missing = cli("loop", "run-once", "--config", config, "--json")
    assert missing.exit_code == 2 and missing.stdout == ""
    assert "--vllm-url" in missing.stderr
    nowhere = cli("worker", "--once", "--config", config)
    assert nowhere.exit_code == 2 and "--vllm-url" in nowhere.stderr
