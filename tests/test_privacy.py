"""Privacy: secrets never leave in `tunegate settings show` or a settings error message, and SQL
parameters (row values: PII) never reach a database error's message."""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydantic import BaseModel, SecretStr
from typer.testing import CliRunner

from core.settings import Settings, SettingsError, load_settings, mask_url, secret_kind

SECRETS = {
    "TUNEGATE_SECRET_KEY": "sk-session-0123456789",
    "TUNEGATE_DATABASE__URL": "postgresql+psycopg://tg:db-pa55word@db.internal:5432/tunegate",
    "TUNEGATE_GUARDRAILS__JUDGE_URL": "https://judge:judge-pa55@judge.example/v1?api-key=judge-query-key&x=1",
    "TUNEGATE_GUARDRAILS__JUDGE_API_KEY": "sk-judge-abcdef123456",
    "TUNEGATE_REVIEW__WEBHOOK_URL": "https://hook:hook-pa55@hooks.example.com/services/T0/B0/webhook-path-token",
    "TUNEGATE_VLLM__URL": "http://vllm-user:vllm-pa55@127.0.0.1:8100",
}
# The parts of those values that are secret (user names and hosts may be shown).
SECRET_PARTS = [
    "sk-session-0123456789",
    "db-pa55word",
    "judge-pa55",
    "judge-query-key",
    "sk-judge-abcdef123456",
    "hook-pa55",
    "webhook-path-token",
    "vllm-pa55",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("TUNEGATE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tunegate.yaml"
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    return str(err.value)


def assert_no_secret(text: str) -> None:
    leaked = [s for s in SECRET_PARTS + ["hunter2", "pa55word", "tok-123"] if s in text]
    assert not leaked, f"{leaked} in {text}"


# --- settings show -----------------------------------------------------------------------------------


def test_settings_show_masks_every_secret(monkeypatch):
    from tunegate.cli import app

    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["settings", "show"])
    assert result.exit_code == 0, result.output
    assert_no_secret(result.output)
    data = json.loads(result.stdout)
    assert data["secret_key"] == "***"
    assert data["guardrails"]["judge_api_key"] == "***"
    # What is not secret stays readable: user, host, port, path of the database and the judge.
    assert data["database"]["url"] == "postgresql+psycopg://tg:***@db.internal:5432/tunegate"
    assert data["guardrails"]["judge_url"] == "https://judge:***@judge.example/v1?api-key=***&x=1"
    assert data["review"]["webhook_url"] == "https://hook:***@hooks.example.com/***"
    assert data["vllm"]["url"] == "http://vllm-user:***@127.0.0.1:8100"


def test_settings_repr_holds_no_secret(monkeypatch):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert_no_secret(repr(settings) + str(settings))
    assert settings.secret_key.get_secret_value() == SECRETS["TUNEGATE_SECRET_KEY"]
    assert settings.database_url == SECRETS["TUNEGATE_DATABASE__URL"]  # the code still gets the real value


# --- error messages ----------------------------------------------------------------------------------


def test_bad_secret_in_the_file_names_field_and_file_but_not_the_value(tmp_path):
    path = write(tmp_path, "secret_key: hunter2\n")
    message = error_of(path)
    assert "`secret_key` = '***'" in message and str(path) in message
    assert_no_secret(message)


def test_bad_secret_in_the_environment_names_the_variable_but_not_the_value(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEGATE_SECRET_KEY", "hunter2")
    message = error_of(write(tmp_path, "{}\n"))
    assert "`secret_key`" in message and "TUNEGATE_SECRET_KEY" in message and "***" in message
    assert_no_secret(message)


@pytest.mark.parametrize(
    ("yaml_text", "field", "shown"),
    [
        ("database:\n  url: mysql://admin:pa55word@db/x\n", "`database.url`", "'mysql://admin:***@db/x'"),
        ("database: postgresql://admin:pa55word@db/x\n", "`database`", "'postgresql://admin:***@db/x'"),
        ("guardrails:\n  judge_api_key: [sk-judge-abcdef123456]\n", "`guardrails.judge_api_key`", "'***'"),
        ("review:\n  webhook_url: [https://hooks.example.com/webhook-path-token]\n", "`review.webhook_url`", "["),
        ("secret_kye: hunter2\n", "`secret_kye`", "'***'"),
        ("guardrails:\n  judge_apikey: tok-123\n", "`guardrails.judge_apikey`", "'***'"),
        ("databse:\n  url: postgresql://admin:pa55word@db/x\n", "`databse`", "admin:***@db/x"),
        ("database: [postgresql://admin:pa55word@db/x]\n", "`database`", "['postgresql://admin:***@db/x']"),
        (
            "review:\n  webhook_url: {url: https://hooks.example.com/webhook-path-token}\n",
            "`review.webhook_url`",
            "***",
        ),
    ],
)
def test_settings_errors_never_show_a_secret(tmp_path, yaml_text, field, shown):
    message = error_of(write(tmp_path, yaml_text))
    assert field in message and shown in message, message
    assert_no_secret(message)


# --- the rules themselves ----------------------------------------------------------------------------


def test_mask_url_hides_passwords_tokens_and_secret_paths():
    assert mask_url("postgresql+psycopg://u:p@h:5432/db") == "postgresql+psycopg://u:***@h:5432/db"
    assert mask_url("sqlite:///var/tunegate.db") == "sqlite:///var/tunegate.db"
    assert mask_url("https://h/v1?token=abc&model=m") == "https://h/v1?token=***&model=m"
    assert mask_url("https://h/services/T0/B0/XYZ", hide_path=True) == "https://h/***"
    assert mask_url("not a url") == "not a url"
    assert mask_url("see https://u:p@h/x and https://h/?key=k") == "see https://u:***@h/x and https://h/?key=***"


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        yield f"{prefix}{name}", info
        for arg in [info.annotation, *getattr(info.annotation, "__args__", ())]:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from _fields(arg, f"{prefix}{name}.")


def test_every_field_named_like_a_secret_is_declared_secret():
    secret_name = re.compile(r"(?:^|_)(?:secrets?|password|passwd|token|api_?key|credentials?|webhook)(?:_|$)", re.I)
    fields = dict(_fields(Settings))
    named = [f for f in fields if secret_name.search(f.rsplit(".", 1)[-1])]
    assert {"secret_key", "guardrails.judge_api_key", "review.webhook_url"} <= set(named)
    for field in named:
        assert secret_kind(tuple(field.split("."))) is not None, f"`{field}` looks secret but is not declared so"
    assert fields["secret_key"].annotation is SecretStr


def test_invalid_yaml_is_located_but_not_quoted(tmp_path):
    # PyYAML's own message quotes the offending line, secret and all.
    for text in ("secret_key: [hunter2\n", "seed: 1\nsecret_key: 'hunter2\n"):
        message = error_of(write(tmp_path, text))
        assert "not valid YAML at line" in message
        assert_no_secret(message)


# --- SQL parameters ----------------------------------------------------------------------------------

ROW_SECRET = "bob.secret@example.com"


@pytest.fixture
def table(db_url):
    """An engine from `make_engine` and a fresh table `(email unique, n not null)` in it."""
    from core.db.session import make_engine

    engine = make_engine(db_url)
    name = f"privacy_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {name} (email VARCHAR(200) UNIQUE, n INTEGER NOT NULL)"))
    yield engine, name
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {name}"))
    engine.dispose()


def insert(engine: sa.Engine, name: str, email, n) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {name} (email, n) VALUES (:email, :n)"), {"email": email, "n": n})


def assert_no_row_values(err: pytest.ExceptionInfo) -> None:
    for text in (str(err.value), repr(err.value), str(err.value.orig)):
        assert ROW_SECRET not in text and "sk-row" not in text, text


def test_a_duplicate_row_error_does_not_carry_the_row(table):
    engine, name = table
    insert(engine, name, ROW_SECRET, 1)
    with pytest.raises(sa.exc.IntegrityError) as err:
        insert(engine, name, ROW_SECRET, 2)
    assert_no_row_values(err)
    assert "hidden" in str(err.value) and name in str(err.value)  # the statement is still there


def test_a_null_column_error_does_not_carry_the_row(table):
    engine, name = table
    with pytest.raises(sa.exc.IntegrityError) as err:
        insert(engine, name, ROW_SECRET, None)
    assert_no_row_values(err)


def test_a_parameter_the_driver_cannot_bind_is_not_shown(table):
    engine, name = table
    with pytest.raises(sa.exc.StatementError) as err:
        insert(engine, name, {"email": ROW_SECRET}, 1)
    assert_no_row_values(err)


@pytest.mark.postgres
def test_postgresql_messages_lose_values_but_keep_their_code(postgres_database):
    from core.db.session import make_engine

    engine = make_engine(postgres_database)
    with pytest.raises(sa.exc.DataError) as err, engine.connect() as conn:
        conn.execute(sa.text("SELECT CAST(:n AS INTEGER)"), {"n": "sk-row-123"})
    assert_no_row_values(err)
    assert "invalid input syntax for type integer" in str(err.value)
    assert err.value.orig.sqlstate == "22P02"  # what code may branch on is untouched
    engine.dispose()


def test_echoed_statements_do_not_log_parameters(tmp_path, caplog):
    from core.db.session import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'echo.db'}", echo=True)
    with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"), engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (email TEXT)"))
        conn.execute(sa.text("INSERT INTO t (email) VALUES (:email)"), {"email": ROW_SECRET})
    assert "INSERT INTO t" in caplog.text and ROW_SECRET not in caplog.text
    engine.dispose()
