"""Training speed of tunegate's LoRA path on one accelerator: tokens/s, peak memory and MFU, as JSON.

Self-contained on purpose (torch, transformers, peft, bitsandbytes only): the GPU machine has no
package registry and none of tunegate's dependencies. Random weights in the shape of Llama-3-8B,
LoRA r=16 on all seven linear kinds, sequence 2048, AdamW, SDPA attention; three settings:

    lora  bf16, batch 2, no activation checkpointing
    lora  bf16, batch 8, activation checkpointing
    qlora nf4,  batch 8, activation checkpointing

each with `--impl baseline` (plain transformers + peft: the model computes full logits and the
loss) and `--impl tunegate`, which differs where the memory and time go in LoRA training of a
large-vocabulary model:
  * the loss is computed from hidden states in chunks, each chunk's logits recomputed in the
    backward pass, so the (batch, seq, 128256) fp32 logits and their gradient never exist at once;
  * frozen base weights never get gradients, and the LoRA matrices are kept in the compute dtype
    (bf16) so no fp32 copies of the activations are made on the adapter path;
  * the optimizer is the fused AdamW kernel over the adapter weights only.

    python bench/gpu_train.py                        # the full comparison on a GPU (< 5 minutes)
    python bench/gpu_train.py --shape tiny --steps 2  # the same code on a CPU in seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SHAPES = {
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
    ),
    "tiny": dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
    ),
}  # fmt: skip
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Measured on one H200, transformers 5.17 + peft 0.21, SDPA, AdamW (the baseline).
REFERENCE = {
    "lora_b2_nockpt": {"tokens_per_s": 8920, "peak_gib": 57.4},
    "lora_b8_ckpt": {"tokens_per_s": 6607, "peak_gib": 43.2},
    "qlora_b8_ckpt": {"tokens_per_s": 6542, "peak_gib": 33.6},
}
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
LOSS_CHUNK = 1024  # tokens per loss chunk: (chunk, vocab) fp32 logits = 0.5 GB for Llama-3's vocabulary


def _quantize_nf4(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Swap every decoder linear layer for a bitsandbytes NF4 one (random weights need no checkpoint)."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name in ALL_LINEAR:
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=False,
                    compute_dtype=dtype,
                    quant_type="nf4",
                    compress_statistics=True,
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True
                )
                setattr(parent, name, q.to(child.weight.device))
    torch.cuda.empty_cache()


def build(shape: str, quant: str, device: str, dtype: torch.dtype, impl: str):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if quant == "nf4":
        _quantize_nf4(model, dtype)
    model.requires_grad_(False)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ALL_LINEAR, bias="none")
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            # baseline: peft's default fp32 adapters; tunegate: adapters in the compute dtype
            p.data = p.data.to(torch.float32 if impl == "baseline" else dtype)
    return model


def chunked_lm_loss(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy without materialising all logits: each chunk is recomputed in backward."""
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (batch*(seq-1), hidden)
    targets = labels[:, 1:].reshape(-1)
    n_valid = (targets != -100).sum().clamp(min=1)

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lm_head(h).float(), t, ignore_index=-100, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], LOSS_CHUNK):
        h, t = hidden[start : start + LOSS_CHUNK], targets[start : start + LOSS_CHUNK]
        total = total + checkpoint(chunk_loss, h, t, use_reentrant=False)
    return total / n_valid


def step_fn(model, impl: str):
    inner = model.get_base_model()  # LlamaForCausalLM with LoRA layers injected

    def step(input_ids: torch.Tensor) -> torch.Tensor:
        if impl == "baseline":
            return model(input_ids=input_ids, labels=input_ids).loss
        hidden = inner.model(input_ids=input_ids).last_hidden_state  # (batch, seq, hidden)
        return chunked_lm_loss(hidden, inner.lm_head, input_ids)

    return step


def flops_per_token(model, seq: int) -> float:
    """Model FLOPs per trained token: forward 2N + attention, backward for activations only (frozen base)."""
    cfg = model.get_base_model().config
    n_params = sum(p.numel() for p in model.parameters())
    attention = 4 * cfg.num_hidden_layers * seq * cfg.hidden_size  # QK^T and AV, forward
    forward = 2 * n_params + attention
    return 2 * forward  # backward to the activations costs about one forward; no frozen weight grads


def run_one(shape, quant, batch, ckpt, impl, seq, steps, warmup, device) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(shape, quant, device, dtype, impl)
    if ckpt:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=(device == "cuda" and impl == "tunegate"))
    step = step_fn(model, impl)
    vocab = SHAPES[shape]["vocab_size"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step(input_ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(input_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    seconds = time.perf_counter() - start
    tokens_per_s = batch * seq * steps / seconds
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    peak_flops = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    mfu = flops_per_token(model, seq) * tokens_per_s / peak_flops if peak_flops else None
    trainable = sum(p.numel() for p in params)
    result = {
        "impl": impl, "quant": quant, "batch": batch, "checkpointing": ckpt, "seq": seq,
        "tokens_per_s": round(tokens_per_s, 1), "peak_gib": round(peak, 2) if peak is not None else None,
        "mfu": round(mfu, 4) if mfu is not None else None, "loss": round(float(loss.detach()), 4),
        "trainable_params": trainable,
    }  # fmt: skip
    del model, optimizer, loss
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4, help="Timed steps per setting.")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--impl", choices=["baseline", "tunegate", "both"], default="both")
    parser.add_argument("--settings", default="lora_b2_nockpt,lora_b8_ckpt,qlora_b8_ckpt")
    parser.add_argument("--out", help="Also write the JSON to this file.")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = ["baseline", "tunegate"] if args.impl == "both" else [args.impl]
    results: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": args.shape,
        "torch": torch.__version__,
        "runs": {},
    }
    for setting in args.settings.split(","):
        method, b, ck = setting.split("_")
        quant = "nf4" if method == "qlora" else "none"
        if quant == "nf4" and device != "cuda":
            results["runs"][setting] = {"skipped": "NF4 needs bitsandbytes' CUDA kernels"}
            continue
        batch = int(b.removeprefix("b"))
        for impl in impls:
            r = run_one(args.shape, quant, batch, ck == "ckpt", impl, args.seq, args.steps, args.warmup, device)
            results["runs"].setdefault(setting, {})[impl] = r
            print(json.dumps({setting: r}), flush=True)
        ref = REFERENCE.get(setting)
        ours = results["runs"][setting].get("tunegate")
        if ref and ours and ours["peak_gib"] is not None and args.shape == "llama3-8b":
            ours["speedup_vs_reference"] = round(ours["tokens_per_s"] / ref["tokens_per_s"], 3)
            ours["memory_vs_reference"] = round(ours["peak_gib"] / ref["peak_gib"], 3)
    print(json.dumps(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
