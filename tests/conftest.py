"""Shared fixtures: the embedded base model (built once, cached under var/models) and one vLLM
server for the whole session (start-up takes about 25 s on the CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The same cache `make demo` uses, so neither builds the model twice on one machine.
MODELS_DIR = Path(os.environ.get("TUNEGATE_TEST_MODELS_DIR", REPO / "var" / "models"))


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    from training.base_model import ensure_base_model

    return ensure_base_model(MODELS_DIR, progress=False).path


@pytest.fixture(scope="session")
def vllm_server(base_model_dir, tmp_path_factory):
    from tunegate.settings import VllmSettings
    from tunegate.vllm import VllmServer, free_port

    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    server = VllmServer(base_model_dir, "base", VllmSettings(), port=free_port(), log_path=log)
    with server:
        yield server
