"""Settings: defaults, precedence, and clear errors (field, value, source) with exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import DEFAULT_SECRET, Settings, SettingsError, load_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("TUNEGATE_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tunegate.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.config_file is None
    assert settings.database_url == "sqlite:///var/tunegate.db"
    assert settings.vllm.max_lora_rank == 16


def test_example_file_is_valid():
    settings = load_settings(REPO / "tunegate.example.yaml")
    assert settings.vllm.port == 8100
    assert settings.base_model.served_name == "base"


def test_yaml_values_are_read_and_env_wins(tmp_path, monkeypatch):
    path = write(tmp_path, "vllm:\n  port: 9000\n  max_loras: 4\nvar_dir: /tmp/x\n")
    monkeypatch.setenv("TUNEGATE_VLLM__PORT", "9100")
    settings = load_settings(path)
    assert settings.vllm.port == 9100
    assert settings.vllm.max_loras == 4
    assert settings.database_url == "sqlite:////tmp/x/tunegate.db"


def test_bad_file_value_names_field_value_and_file(tmp_path):
    path = write(tmp_path, "vllm:\n  port: abc\n")
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    message = str(err.value)
    assert "`vllm.port`" in message and "'abc'" in message and str(path) in message


def test_bad_env_value_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEGATE_VLLM__MAX_LORAS", "0")
    with pytest.raises(SettingsError) as err:
        load_settings(write(tmp_path, "{}\n"))
    message = str(err.value)
    assert "`vllm.max_loras`" in message and "TUNEGATE_VLLM__MAX_LORAS" in message and "'0'" in message


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match=r"`databse`.*unknown setting"):
        load_settings(write(tmp_path, "databse:\n  url: x\n"))


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(write(tmp_path, "vllm: [\n"))
    with pytest.raises(SettingsError, match="must be a mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"))


def test_named_file_must_exist(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "missing.yaml")


def test_unsupported_database_and_postgres_driver(tmp_path):
    with pytest.raises(SettingsError, match="`database.url`"):
        load_settings(write(tmp_path, "database:\n  url: mysql://x/y\n"))
    settings = load_settings(write(tmp_path, "database:\n  url: postgresql://127.0.0.1:5432/test\n"))
    assert settings.database_url == "postgresql+psycopg://127.0.0.1:5432/test"


def test_production_refuses_default_secret(tmp_path, monkeypatch):
    with pytest.raises(SettingsError, match="secret_key"):
        load_settings(write(tmp_path, "environment: production\n"))
    monkeypatch.setenv("TUNEGATE_SECRET_KEY", "a-real-secret-value")
    assert load_settings(write(tmp_path, "environment: production\n")).secret_key.get_secret_value() != DEFAULT_SECRET


def test_settings_type_is_the_single_source(tmp_path):
    assert set(Settings.model_fields) >= {"database", "vllm", "base_model", "var_dir", "secret_key"}


def test_cli_exits_2_with_one_clear_message(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEGATE_")}
    env["TUNEGATE_VLLM__PORT"] = "http"
    proc = subprocess.run(
        [sys.executable, "-m", "tunegate.cli", "settings", "show"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "`vllm.port`" in proc.stderr and "TUNEGATE_VLLM__PORT" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_settings_show_masks_secret(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEGATE_")}
    env["TUNEGATE_SECRET_KEY"] = "super-secret-123"
    proc = subprocess.run(
        [sys.executable, "-m", "tunegate.cli", "settings", "show"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "super-secret-123" not in proc.stdout and '"secret_key": "***"' in proc.stdout
