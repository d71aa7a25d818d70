"""`tunegate bootstrap`: build or reuse the embedded base model, then measure it through vLLM.

The accuracies are exact-answer matches of greedy answers served by vLLM's OpenAI server on
held-out phrasings: old facts (which the model was trained on) and new facts (the drift event,
which it must not know). Imports `tunegate` (settings, vLLM process) and `training`.
"""

from __future__ import annotations

from pathlib import Path

from core.io import free_port
from core.settings import Settings
from core.vllm import VllmServer
from training.base_model import ensure_base_model, read_manifest
from training.domain import Domain
from training.fact_eval import fact_accuracy


def base_model_path(settings: Settings, progress: bool = False) -> Path:
    """The folder of the base model to serve: the configured one, or the (built) embedded one."""
    if settings.base_model.path:
        return settings.base_model.path
    return ensure_base_model(settings.models_dir, progress=progress).path


def run_bootstrap(settings: Settings, rebuild: bool = False, evaluate: bool = True, progress: bool = True) -> dict:
    build = ensure_base_model(settings.models_dir, progress=progress, rebuild=rebuild)
    manifest = read_manifest(build.path)
    result: dict = {
        "model_path": str(build.path),
        "model_hash": manifest["model_hash"],
        "params": build.params,
        "build_seconds": build.build_seconds,
        "reused": build.reused,
        "train_steps": build.steps,
        "train_accuracy_teacher_forced": round(build.train_accuracy, 4),
    }
    if not evaluate:
        return result
    domain = Domain()
    name = settings.base_model.served_name
    log = settings.var_dir / "logs" / "vllm-bootstrap.log"
    with VllmServer(build.path, name, settings.vllm, port=free_port(), log_path=log) as server:
        old = fact_accuracy(server.url, name, domain.old_facts)
        new = fact_accuracy(server.url, name, domain.new_facts)
    result |= {
        "old_fact_accuracy": round(old.accuracy, 4),
        "new_fact_accuracy": round(new.accuracy, 4),
        "old_questions": old.n,
        "new_questions": new.n,
        "old_misses": old.wrong[:5],
    }
    return result
