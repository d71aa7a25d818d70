"""Adapter registry: manifest round trip, atomic publish, listing, and vLLM servability refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from training import registry as registry_mod
from training.registry import (
    AdapterNotFoundError,
    AdapterRegistry,
    Manifest,
    UnservableAdapterError,
    VersionExistsError,
    check_servable,
)

BASE_HASH = "base-abc123"


def _tiny_base():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def _save_adapter(dest: Path, peft_config) -> Path:
    """Wrap a fresh tiny Llama with `peft_config` and save the real peft files into `dest`."""
    from peft import get_peft_model

    model = get_peft_model(_tiny_base(), peft_config)
    model.save_pretrained(str(dest))
    return dest


def _lora(**kw):
    from peft import LoraConfig

    kw.setdefault("r", 8)
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    return LoraConfig(task_type="CAUSAL_LM", **kw)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Real peft adapter folders, built once for the module."""
    from peft import PrefixTuningConfig

    root = tmp_path_factory.mktemp("adapters")
    return {
        "lora": _save_adapter(root / "lora", _lora()),
        "dora": _save_adapter(root / "dora", _lora(use_dora=True)),
        "modules_to_save": _save_adapter(root / "mts", _lora(target_modules=["q_proj"], modules_to_save=["lm_head"])),
        "rank32": _save_adapter(root / "rank32", _lora(r=32)),
        "prefix": _save_adapter(root / "prefix", PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")),
    }


def _manifest(version: str = "v1", name: str = "support", **kw) -> Manifest:
    fields = dict(
        name=name,
        version=version,
        base_model="tunegate-bootstrap",
        base_model_hash=BASE_HASH,
        dataset_hash="d" * 64,
        config_hash="c" * 64,
        seed=1234,
        metrics={"exact_match": 0.5, "loss": 1.25},
        trainable_params=2048,
        total_params=51392,
    )
    fields.update(kw)
    return Manifest(**fields)


# ------------------------------------------------------------------------------------------ manifest


def test_manifest_round_trip(tmp_path):
    m = _manifest(parent_version="v1", version="v2", servable=False, unservable_reason="`use_dora` is true")
    assert Manifest.from_dict(m.to_dict()) == m
    m.save(tmp_path / "manifest.json")
    assert Manifest.load(tmp_path / "manifest.json") == m
    assert Manifest.load(tmp_path) == m  # a folder holding manifest.json works too
    assert json.loads((tmp_path / "manifest.json").read_text())["seed"] == 1234
    assert m.created_at.endswith("+00:00")


def test_manifest_rejects_bad_input():
    with pytest.raises(ValueError, match="`version`"):
        _manifest(version="1.0")
    with pytest.raises(ValueError, match="`name`"):
        _manifest(name="../etc")
    with pytest.raises(ValueError, match="`created_at`"):
        _manifest(created_at="yesterday")
    with pytest.raises(ValueError, match="UTC"):
        _manifest(created_at="2025-01-01T00:00:00+02:00")
    with pytest.raises(ValueError, match="unknown fields"):
        Manifest.from_dict({**_manifest().to_dict(), "surprise": 1})
    with pytest.raises(ValueError, match="missing required fields"):
        Manifest.from_dict({"name": "support"})


# ------------------------------------------------------------------------------------------ publish


def test_publish_list_get_latest(tmp_path, adapters):
    reg = AdapterRegistry(tmp_path / "reg", base_model_hash=BASE_HASH)
    assert reg.list() == []
    assert reg.next_version("support") == "v1"

    p1 = reg.publish(adapters["lora"], _manifest("v1"))
    assert p1 == tmp_path / "reg" / "support" / "v1"
    assert {f.name for f in p1.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    }
    assert (p1 / "adapter_model.safetensors").read_bytes() == (
        adapters["lora"] / "adapter_model.safetensors"
    ).read_bytes()

    assert reg.next_version("support") == "v2"
    reg.publish(adapters["lora"], _manifest("v2", parent_version="v1", metrics={"exact_match": 0.7}))
    reg.publish(adapters["lora"], _manifest("v1", name="billing"))

    assert [(m.name, m.version) for m in reg.list()] == [
        ("billing", "v1"),
        ("support", "v1"),
        ("support", "v2"),
    ]
    assert [m.version for m in reg.list("support")] == ["v1", "v2"]
    latest = reg.get("support")
    assert latest.version == "v2" and latest.parent_version == "v1" and latest.metrics == {"exact_match": 0.7}
    assert latest.servable and latest.unservable_reason is None and latest.peft_type == "LORA"
    assert reg.get("support", "v1") == Manifest.load(p1)
    assert reg.path("support", "v2") == tmp_path / "reg" / "support" / "v2"
    assert reg.path("support") == reg.path("support", "v2")

    with pytest.raises(VersionExistsError, match="`v3`"):
        reg.publish(adapters["lora"], _manifest("v2"))
    with pytest.raises(AdapterNotFoundError, match="v9"):
        reg.get("support", "v9")
    with pytest.raises(AdapterNotFoundError, match="nobody"):
        reg.path("nobody")


def test_versions_sort_numerically(tmp_path, adapters):
    reg = AdapterRegistry(tmp_path)
    for v in ("v2", "v10", "v9"):
        reg.publish(adapters["lora"], _manifest(v))
    assert [m.version for m in reg.list("support")] == ["v2", "v9", "v10"]
    assert reg.get("support").version == "v10"
    assert reg.next_version("support") == "v11"


def test_publish_requires_peft_files(tmp_path):
    reg = AdapterRegistry(tmp_path / "reg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        reg.publish(tmp_path / "empty", _manifest())
    (tmp_path / "empty" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        reg.publish(tmp_path / "empty", _manifest())


def test_failed_copy_leaves_no_version(tmp_path, adapters, monkeypatch):
    """An ordinary error halfway through the copy cleans up: no version, no tmp folder."""
    reg = AdapterRegistry(tmp_path)
    real_copy = shutil.copy2
    calls = []

    def failing_copy(src, dst, *a, **kw):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_copy(src, dst, *a, **kw)

    monkeypatch.setattr(registry_mod.shutil, "copy2", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        reg.publish(adapters["lora"], _manifest())
    assert len(calls) == 2
    assert reg.list() == [] and not (tmp_path / "support" / "v1").exists()
    assert list((tmp_path / "support").iterdir()) == []


def test_crash_mid_publish_is_invisible_and_gcd(tmp_path, adapters, monkeypatch):
    """A hard crash (a BaseException skips cleanup, as a kill would) leaves a .tmp-* folder."""

    class Crash(BaseException):
        pass

    reg = AdapterRegistry(tmp_path)
    reg.publish(adapters["lora"], _manifest("v1"))
    real_copy = shutil.copy2
    calls = []

    def crashing_copy(src, dst, *a, **kw):
        calls.append(src)
        if len(calls) == 2:
            raise Crash()
        return real_copy(src, dst, *a, **kw)

    monkeypatch.setattr(registry_mod.shutil, "copy2", crashing_copy)
    with pytest.raises(Crash):
        reg.publish(adapters["lora"], _manifest("v2"))
    monkeypatch.undo()

    leftovers = list((tmp_path / "support").glob(".tmp-*"))
    assert len(leftovers) == 1 and any(leftovers[0].iterdir())  # half a copy, no manifest
    assert not (leftovers[0] / "manifest.json").exists()
    assert [m.version for m in reg.list()] == ["v1"]
    assert reg.get("support").version == "v1"
    assert reg.next_version("support") == "v2"

    assert reg.gc_tmp() == []  # too young for the default age guard: could be a live publish
    assert reg.gc_tmp(min_age_s=0) == leftovers
    assert not leftovers[0].exists()
    assert reg.publish(adapters["lora"], _manifest("v2")).name == "v2"


# ------------------------------------------------------------------------------------------ servability


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        ("dora", "`use_dora`"),
        ("modules_to_save", "`modules_to_save`"),
        ("rank32", "`r`"),
        ("prefix", "prefix tuning"),
    ],
)
def test_unservable_adapters_are_refused(tmp_path, adapters, kind, field):
    reg = AdapterRegistry(tmp_path, max_lora_rank=16)
    ok, reason = check_servable(adapters[kind], BASE_HASH, BASE_HASH, 16)
    assert not ok and field in reason

    with pytest.raises(UnservableAdapterError, match="allow_unservable") as exc:
        reg.publish(adapters[kind], _manifest())
    assert field in exc.value.reason
    assert reg.list() == [] and not (tmp_path / "support" / "v1").exists()

    reg.publish(adapters[kind], _manifest(), allow_unservable=True)
    stored = reg.get("support", "v1")
    assert stored.servable is False and field in stored.unservable_reason


def test_refusal_messages_say_the_fix(adapters):
    _, reason = check_servable(adapters["dora"], BASE_HASH, None, 16)
    assert "use_dora=False" in reason
    _, reason = check_servable(adapters["rank32"], BASE_HASH, None, 16)
    assert "r<=16" in reason and "--max-lora-rank" in reason
    _, reason = check_servable(adapters["prefix"], BASE_HASH, None, 16)
    assert reason.startswith("vLLM serves only LoRA adapters; prefix tuning") and "cannot be served" in reason
    assert "LoraConfig" in reason
    _, reason = check_servable(adapters["modules_to_save"], BASE_HASH, None, 16)
    assert "modules_to_save=None" in reason and "lm_head" in reason


def test_rank_limit_follows_max_lora_rank(tmp_path, adapters):
    assert check_servable(adapters["rank32"], BASE_HASH, BASE_HASH, 32) == (True, None)
    reg = AdapterRegistry(tmp_path, max_lora_rank=64)
    reg.publish(adapters["rank32"], _manifest())
    assert reg.get("support").servable


def test_base_model_mismatch_is_refused(tmp_path, adapters):
    ok, reason = check_servable(adapters["lora"], "other-base", BASE_HASH, 16)
    assert not ok and "`base_model_hash`" in reason and "retrain" in reason
    assert check_servable(adapters["lora"], "other-base", None, 16) == (True, None)  # nothing to compare with

    reg = AdapterRegistry(tmp_path, base_model_hash=BASE_HASH)
    with pytest.raises(UnservableAdapterError, match="base_model_hash"):
        reg.publish(adapters["lora"], _manifest(base_model_hash="other-base"))
    reg.publish(adapters["lora"], _manifest(base_model_hash="other-base"), allow_unservable=True)
    stored = reg.get("support")
    assert not stored.servable and "does not match the served base model" in stored.unservable_reason


def test_all_problems_are_reported(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 64, "use_dora": True, "modules_to_save": ["embed_tokens"]})
    )
    ok, reason = check_servable(d, "x", "y", 16)
    assert not ok
    for part in ("`use_dora`", "`modules_to_save`", "`r` is 64", "`base_model_hash`"):
        assert part in reason


def test_registry_config_validation(tmp_path):
    with pytest.raises(ValueError, match="`max_lora_rank`"):
        AdapterRegistry(tmp_path, max_lora_rank=0)
