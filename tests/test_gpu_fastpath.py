"""The fast path of `tunegate train` on the CPU: the chunked loss is the stock loss (values and gradients),
the fast-path switches validate, round-trip and resolve to the old behaviour on a CPU, and the GPU
benchmark's tiny shape runs both trainers and prints agreeing losses. No timing is asserted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import gpu_train
from training.fastpath import (
    FastPathError,
    causal_lm_loss,
    chunked_loss_sum,
    resolve_fast_path,
    settle_checkpointing,
)
from training.sft import TrainConfig, build_trainer, prepare_model

VOCAB = 300


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def chat_like_rows():
    """Variable-length rows whose first half (the prompt) carries no label, as completion-only SFT."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(1)
    rows = []
    for length in (20, 33, 17, 40):
        ids = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2 :]})
    return Dataset.from_list(rows)


def config(**switches) -> TrainConfig:
    return TrainConfig(name="t", train_file=Path("x.jsonl"), max_length=64, batch_size=4, max_steps=1, **switches)


def loss_and_grads(loss_kind: str, tmp_path: Path, **fast_changes):
    cfg = config(loss=loss_kind, loss_chunk_tokens=7)  # chunks far smaller than the batch: many boundaries
    fast = dataclasses.replace(resolve_fast_path(cfg), **fast_changes)
    model = prepare_model(tiny_llama(), cfg, fast)
    for name, param in model.named_parameters():  # LoRA B starts at zero: make the adapter path matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    trainer = build_trainer(cfg, fast, model, gpu_train.tiny_tokenizer(), chat_like_rows(), output_dir=tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, model, batch


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6), name


def test_chunked_loss_equals_the_stock_losses_values_and_gradients(tmp_path):
    trl_loss, trl_grads, model, batch = loss_and_grads("trl", tmp_path / "trl")
    ours, our_grads, _, _ = loss_and_grads("chunked", tmp_path / "chunked")
    assert_same((ours, our_grads), (trl_loss, trl_grads))  # SFTTrainer's own loss, through the same trainer
    # and the model's own loss (full logits) on the same weights and batch
    model.zero_grad()
    stock = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    stock.backward()
    stock_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert_same((ours, our_grads), (stock.detach(), stock_grads))


def test_padding_free_batch_gives_the_same_loss(tmp_path):
    """Packed rows (one padding-free row, position ids restarting per row) through the fast loss."""
    trl_loss, trl_grads, _, batch = loss_and_grads("trl", tmp_path / "trl", padding_free=True)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    ours, our_grads, _, _ = loss_and_grads("chunked", tmp_path / "chunked", padding_free=True)
    assert_same((ours, our_grads), (trl_loss, trl_grads))


def test_chunked_function_matches_cross_entropy_for_hidden_weight_and_bias():
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    head = torch.nn.Linear(16, 40)  # a trainable head with a bias: every gradient the function returns
    targets = torch.randint(0, 40, (50,))
    targets[::7] = -100
    full = F.cross_entropy(head(hidden), targets, ignore_index=-100, reduction="sum")
    expected = torch.autograd.grad(full, [hidden, head.weight, head.bias])
    ours = chunked_loss_sum(hidden, head.weight, head.bias, targets, chunk=8)
    got = torch.autograd.grad(ours, [hidden, head.weight, head.bias])
    assert torch.allclose(ours, full, rtol=1e-5)
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(e, g, rtol=1e-4, atol=1e-6)


def test_causal_loss_divides_by_the_trainers_token_count():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20, bias=False)
    hidden, labels = torch.randn(2, 6, 8), torch.randint(0, 20, (2, 6))
    labels[0, :3] = -100
    per_token = causal_lm_loss(hidden, head, labels)
    assert torch.allclose(causal_lm_loss(hidden, head, labels, num_items_in_batch=14), per_token * 8 / 14)
    assert causal_lm_loss(hidden, head, torch.full_like(labels, -100)).item() == 0.0  # nothing to learn: zero


@pytest.mark.parametrize(
    "switches, message",
    [
        ({"loss": "fused"}, "`loss` is 'fused'; use `auto`, `liger`, `chunked` or `trl`"),
        ({"loss_chunk_tokens": 0}, "`loss_chunk_tokens` is 0; use a positive number"),
        ({"padding_free": "yes"}, "`padding_free` is 'yes'; use true, false or auto"),
        ({"gradient_checkpointing": "sometimes"}, "`gradient_checkpointing` is 'sometimes'"),
        ({"liger_layers": 1.5}, "`liger_layers` is 1.5"),
        ({"adapter_dtype": "fp16"}, "`adapter_dtype` is 'fp16'; use `auto`, `bfloat16` or `float32`"),
        ({"optimizer": "sgd"}, "`optimizer` is 'sgd'; use `adamw_torch_fused` or `adamw_torch`"),
        ({"attn_implementation": "paged"}, "`attn_implementation` is 'paged'"),
        ({"padding_free": True}, "`padding_free` is true.*`attn_implementation: flash_attention_2`"),
        ({"method": "prefix", "loss": "chunked"}, "`loss` is `chunked`.*`loss: trl` or `auto`"),
    ],
)
def test_fast_path_errors_name_the_field_and_the_fix(switches, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({"name": "x", "train_file": "a.jsonl", **switches})


def test_fast_path_config_round_trips(tmp_path):
    cfg = config(
        loss="chunked", loss_chunk_tokens=512, liger_layers=False, padding_free=True,
        attn_implementation="flex_attention", adapter_dtype="bfloat16", optimizer="adamw_torch",
        gradient_checkpointing=True,
    )  # fmt: skip
    cfg.train_file = tmp_path / "train.jsonl"
    again = TrainConfig.from_yaml(cfg.save(tmp_path / "run.yaml"))
    assert again == cfg and again.config_hash() == cfg.config_hash()
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig.from_yaml(config().save(tmp_path / "defaults.yaml")).loss == "auto"
    assert cfg.config_hash() != dataclasses.replace(cfg, loss="trl").config_hash()


def test_on_a_cpu_every_auto_resolves_to_the_previous_behaviour():
    fast = resolve_fast_path(config(), cuda=False)
    assert (fast.loss, fast.adapter_dtype, fast.padding_free, fast.liger_layers) == ("trl", "float32", False, False)
    assert fast.gradient_checkpointing is False and fast.attn_implementation is None
    assert fast.optimizer == "adamw_torch_fused"  # transformers' default AdamW since torch 2.8, as before


def test_on_cuda_auto_picks_the_fast_path():
    with_liger = resolve_fast_path(config(), cuda=True, liger=True, flash_attn=False)
    assert (with_liger.loss, with_liger.liger_layers, with_liger.adapter_dtype) == ("liger", True, "bfloat16")
    assert with_liger.padding_free is False and with_liger.gradient_checkpointing is None  # decided from memory
    plain = resolve_fast_path(config(), cuda=True, liger=False, flash_attn=True)
    assert (plain.loss, plain.attn_implementation, plain.padding_free) == ("chunked", "flash_attention_2", True)
    prefix = resolve_fast_path(config(method="prefix"), cuda=True, liger=True, flash_attn=True)
    assert (prefix.loss, prefix.padding_free, prefix.adapter_dtype) == ("trl", False, "float32")
    with pytest.raises(FastPathError, match="`loss: liger` needs a CUDA GPU"):
        resolve_fast_path(config(loss="liger"), cuda=False)
    with pytest.raises(FastPathError, match="`liger_layers: true`"):
        resolve_fast_path(config(liger_layers=True), cuda=True, liger=False)


def test_auto_checkpointing_turns_on_only_when_memory_asks():
    fast = resolve_fast_path(config(), cuda=True, liger=False, flash_attn=False)
    model = tiny_llama()
    assert settle_checkpointing(fast, model, 8 * 2048, device_bytes=2**40).gradient_checkpointing is False
    assert settle_checkpointing(fast, model, 8 * 2048, device_bytes=2**20).gradient_checkpointing is True
    fixed = dataclasses.replace(fast, gradient_checkpointing=False)
    assert settle_checkpointing(fixed, model, 8 * 2048, device_bytes=1).gradient_checkpointing is False


def test_gpu_bench_tiny_prints_both_runs_and_agreeing_losses(capsys, tmp_path):
    gpu_train.main(["--shape", "tiny", "--steps", "2", "--warmup", "1", "--out", str(tmp_path / "r.json")])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "r.json").read_text())
    lora = printed["runs"]["lora"]
    assert lora["plain"]["tokens_per_s"] > 0 and lora["tunegate"]["tokens_per_s"] > 0
    assert lora["tunegate"]["fast_path"]["loss"] == "chunked"  # tunegate's own loss, not SFTTrainer's
    assert lora["losses_compared"] == 3 and lora["losses_agree"] is True
    assert set(lora) >= {"speedup", "memory_ratio", "max_loss_rel_diff"} and lora["memory_ratio"] is None  # CPU
    assert "skipped" in printed["runs"]["qlora"]  # NF4 needs CUDA
