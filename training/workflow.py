"""Training wired to the rest of tunegate: the registry under `var/adapters`, the served base model,
and the `adapters` table that routing and the eval suite read.

`train_and_register` is what `tunegate train` (and, later, a training job) runs. Imports
`tunegate` (settings, db) and `training`.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from core.settings import Settings
from training.base_model import model_hash
from training.bootstrap import base_model_path
from training.registry import AdapterRegistry, Manifest, version_number
from training.sft import TrainConfig, train_adapter


def resolve_base(settings: Settings, config: TrainConfig) -> Path:
    if config.base_model == "embedded":
        return base_model_path(settings)
    return Path(config.base_model)


def open_registry(settings: Settings, base_path: Path | None = None) -> AdapterRegistry:
    """The registry; with `base_path`, it refuses adapters trained on any other base model."""
    return AdapterRegistry(
        settings.adapters_dir,
        max_lora_rank=settings.vllm.max_lora_rank,
        base_model_hash=model_hash(base_path) if base_path else None,
    )


def record_adapter(settings: Settings, manifest: Manifest) -> int:
    """Insert the registered adapter into the database (the schema is migrated first); return its id."""
    from core.db import Adapter, make_engine, session_factory, session_scope, upgrade

    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with session_scope(session_factory(engine)) as session:
            parent_id = None
            if manifest.parent_version:
                parent_id = session.scalar(
                    select(Adapter.id).where(
                        Adapter.name == manifest.name,
                        Adapter.version == version_number(manifest.parent_version),
                    )
                )
            row = Adapter(
                name=manifest.name,
                version=version_number(manifest.version),
                base_model_hash=manifest.base_model_hash,
                dataset_hash=manifest.dataset_hash,
                config_hash=manifest.config_hash,
                seed=manifest.seed,
                parent_id=parent_id,
                servable=manifest.servable,
                unservable_reason=manifest.unservable_reason,
                metrics=manifest.metrics,
                manifest=manifest.to_dict(),
            )
            session.add(row)
            session.flush()
            return row.id
    finally:
        engine.dispose()


def train_and_register(settings: Settings, config: TrainConfig, progress: bool = True) -> dict:
    base = resolve_base(settings, config)
    registry = open_registry(settings, base)
    result = train_adapter(config, base, settings.var_dir, registry if config.publish else None, progress)
    summary = {
        "adapter_dir": str(result.adapter_dir),
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "trainable_fraction": round(result.trainable_fraction, 6),
        "metrics": result.metrics,
        "resumed_from": result.resumed_from,
    }
    if result.manifest is not None:
        summary |= {
            "name": result.manifest.name,
            "version": result.manifest.version,
            "servable": result.manifest.servable,
            "unservable_reason": result.manifest.unservable_reason,
            "adapter_id": record_adapter(settings, result.manifest),
        }
    return summary
