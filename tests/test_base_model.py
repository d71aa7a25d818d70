"""The bootstrap base model: tokenizer, chat template, cache, and answers served by vLLM."""

import json
import os
import subprocess
import sys

import pytest

from core.vllm import chat_greedy
from training.base_model import (
    IGNORE_INDEX,
    BaseModelConfig,
    build_tokenizer,
    cache_key,
    encode_chat,
    ensure_base_model,
    read_manifest,
)
from training.domain import Domain
from training.fact_eval import fact_accuracy, normalise

from .conftest import MODELS_DIR, REPO


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(Domain(), BaseModelConfig())


def test_every_code_is_one_token(tokenizer):
    for code in Domain().codes:
        ids = tokenizer.encode(f"What is tariff {code}?", add_special_tokens=False)
        assert tokenizer.convert_tokens_to_ids(code) in ids


def test_chat_template_and_answer_only_labels(tokenizer):
    messages = [
        {"role": "user", "content": "Where is T123 available?"},
        {"role": "assistant", "content": "Ashford"},
    ]
    text = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|user|>\nWhere is T123 available?<|end|>\n<|assistant|>\n"
    ids, labels = encode_chat(tokenizer, messages)
    answer = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "Ashford<|end|>"
    assert labels[: len(ids) - len(answer)] == [IGNORE_INDEX] * (len(ids) - len(answer))


def test_round_trip_text(tokenizer):
    text = "Energy on tariff T417 costs 0.231 EUR/kWh."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_config_validation():
    with pytest.raises(ValueError, match="`head_dim`"):
        BaseModelConfig(head_dim=16, hidden_size=128)
    with pytest.raises(ValueError, match="`hidden_size`"):
        BaseModelConfig(hidden_size=100)


def test_cache_key_depends_on_config():
    domain = Domain()
    assert cache_key(domain, BaseModelConfig()) == cache_key(domain, BaseModelConfig())
    assert cache_key(domain, BaseModelConfig()) != cache_key(domain, BaseModelConfig(seed=1))


def test_normalise():
    assert normalise(" 12.40 EUR. ") == normalise("12.40  eur")


@pytest.mark.slow
def test_build_is_cached_and_complete(base_model_dir):
    again = ensure_base_model(MODELS_DIR, progress=False)
    assert again.reused and again.path == base_model_dir
    manifest = read_manifest(base_model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (base_model_dir / name).exists()
    config = json.loads((base_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["head_dim"] == 64
    assert manifest["params"] > 0 and not list(MODELS_DIR.glob(".tmp-*"))


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_answers_an_old_fact_and_lists_the_model(vllm_server):
    import httpx

    models = httpx.get(f"{vllm_server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["base"]
    fact = Domain().old_facts[0]
    [answer] = chat_greedy(vllm_server.url, "base", [[{"role": "user", "content": fact.heldout_questions[0]}]])
    assert normalise(answer) == normalise(fact.answer)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_knows_old_facts_not_new_ones(vllm_server):
    domain = Domain()
    old = fact_accuracy(vllm_server.url, "base", domain.old_facts[::5])
    new = fact_accuracy(vllm_server.url, "base", domain.new_facts[::2])
    assert old.accuracy >= 0.85, old.wrong
    assert new.accuracy <= 0.25


@pytest.mark.slow
@pytest.mark.vllm
def test_bootstrap_json_through_the_cli(base_model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEGATE_")}
    env["TUNEGATE_VAR_DIR"] = str(MODELS_DIR.parent)
    proc = subprocess.run(
        [sys.executable, "-m", "tunegate.cli", "bootstrap", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["reused"] is True and result["model_path"] == str(base_model_dir)
    for key in ("old_fact_accuracy", "new_fact_accuracy", "params", "build_seconds"):
        assert key in result
    assert result["old_fact_accuracy"] >= 0.9 and result["new_fact_accuracy"] <= 0.2


def test_concurrent_builds_take_turns_one_trains_the_others_reuse(tmp_path):
    """Two callers at once (the demo and a test session, say): one builds, the other waits on the lock
    and reuses that build instead of training the same model again."""
    from concurrent.futures import ThreadPoolExecutor

    from training.domain import DomainConfig

    domain = DomainConfig(n_old_tariffs=2, n_new_tariffs=0)
    tiny = BaseModelConfig(vocab_size=300, num_layers=1, intermediate_size=128, max_steps=2, batch_size=4,
                           warmup_steps=1, check_every=1)  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: ensure_base_model(tmp_path, domain, tiny, progress=False), range(2)))
    assert sorted(r.reused for r in results) == [False, True]
    assert results[0].path == results[1].path and (results[0].path / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
