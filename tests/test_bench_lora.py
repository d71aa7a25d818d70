"""The multi-LoRA benchmark's adapters are real, distinct and non-zero; no vLLM, no timing."""

import json

from bench.lora_throughput import TARGET_MODULES, make_adapters


def test_make_adapters_writes_distinct_nonzero_lora_weights(base_model_dir, tmp_path):
    from safetensors.torch import load_file

    paths = make_adapters(base_model_dir, tmp_path, n=2)
    assert [p.name for p in paths] == ["a0", "a1"]
    weights = []
    for path in paths:
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 16 and config["lora_alpha"] == 32
        assert sorted(config["target_modules"]) == sorted(TARGET_MODULES)
        weights.append(load_file(path / "adapter_model.safetensors"))
    a, b = weights
    assert a.keys() == b.keys()
    # 4 layers x 7 projections x (A, B)
    assert len(a) == 4 * len(TARGET_MODULES) * 2
    lora_b = [k for k in a if "lora_B" in k]
    assert lora_b and all(a[k].abs().sum() > 0 and b[k].abs().sum() > 0 for k in lora_b)
    assert any(not a[k].equal(b[k]) for k in a)
    assert all(not a[k].equal(b[k]) for k in lora_b)
