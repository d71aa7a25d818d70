"""The fast path of `tunegate train`: which kernels a run uses, and the loss that never holds all logits.

`resolve_fast_path` turns the `TrainConfig` switches (each `auto` by default) into concrete
choices for this machine: on a CUDA GPU Liger Kernel's fused linear cross-entropy (or, without
the `liger-kernel` package, the pure-torch `ChunkedLinearCrossEntropy` below), Liger's RMSNorm,
RoPE and SwiGLU kernels, bf16 LoRA weights, padding-free packing where the attention kernel
keeps packed rows apart, and gradient checkpointing only when a batch's activations would not
fit; on a CPU every `auto` resolves to what `tunegate train` did before (SFTTrainer's own loss,
fp32 adapters, no packing, no checkpointing). `FastSFTTrainer` is TRL's `SFTTrainer` with the
loss computed from the final hidden states by the chosen kernel: the (tokens, vocabulary)
logits exist only one chunk at a time, and only for tokens that have a label.

Imports torch, transformers, trl (and liger_kernel when used); `training.sft` imports this
module lazily, when a run starts.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
import types
from dataclasses import dataclass

import torch
from trl import SFTTrainer

IGNORE_INDEX = -100
PACKED_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")
MEMORY_HEADROOM = 0.9  # `gradient_checkpointing: auto` keeps the estimate under this share of GPU memory


class FastPathError(Exception):
    """A fast-path switch asks for something this machine cannot do; the message says what to change."""


@dataclass(frozen=True)
class FastPath:
    """The resolved choices of one run (no `auto` left, except checkpointing until the model is known)."""

    device: str  # "cuda" or "cpu"
    loss: str  # "liger", "chunked" or "trl"
    loss_chunk_tokens: int
    liger_layers: bool
    padding_free: bool
    attn_implementation: str | None  # None: transformers' default (SDPA)
    adapter_dtype: str  # "bfloat16" or "float32"
    optimizer: str
    gradient_checkpointing: bool | None  # None: decide from memory once the model is loaded

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_fast_path(
    config, *, cuda: bool | None = None, liger: bool | None = None, flash_attn: bool | None = None
) -> FastPath:
    """Resolve `config`'s fast-path switches for this machine (arguments override detection, for tests)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    liger = (cuda and _installed("liger_kernel") and _installed("triton")) if liger is None else liger
    flash_attn = (cuda and _installed("flash_attn")) if flash_attn is None else flash_attn
    lora = config.method in ("lora", "qlora")

    loss = config.loss
    if loss == "auto":
        loss = ("liger" if liger else "chunked") if cuda and lora else "trl"
    elif loss == "liger" and not (cuda and liger):
        raise FastPathError(
            "`loss: liger` needs a CUDA GPU and `pip install liger-kernel`; "
            "use `loss: chunked` (any device) or `loss: auto`"
        )
    liger_layers = config.liger_layers
    if liger_layers == "auto":
        liger_layers = bool(cuda and liger)
    elif liger_layers and not (cuda and liger):
        raise FastPathError(
            "`liger_layers: true` needs a CUDA GPU and `pip install liger-kernel`; set it to `auto` or `false`"
        )
    attn = config.attn_implementation
    if attn == "auto":
        attn = "flash_attention_2" if flash_attn and cuda else None
    elif attn == "flash_attention_2" and not flash_attn:
        raise FastPathError(
            "`attn_implementation: flash_attention_2` needs a CUDA GPU and `pip install flash-attn`; "
            "use `auto` or `sdpa`"
        )
    padding_free = config.padding_free
    if padding_free == "auto":
        padding_free = attn in PACKED_ATTENTION and lora
    adapter_dtype = config.adapter_dtype
    if adapter_dtype == "auto":
        adapter_dtype = "bfloat16" if cuda and lora else "float32"
    checkpointing = config.gradient_checkpointing
    if checkpointing == "auto":
        checkpointing = None if cuda else False
    return FastPath(
        device="cuda" if cuda else "cpu",
        loss=loss,
        loss_chunk_tokens=config.loss_chunk_tokens,
        liger_layers=bool(liger_layers),
        padding_free=bool(padding_free),
        attn_implementation=attn,
        adapter_dtype=adapter_dtype,
        optimizer=config.optimizer,
        gradient_checkpointing=checkpointing,
    )


def activation_bytes(model_config, tokens: int, element_size: int = 2) -> int:
    """Rough activations a decoder keeps for the backward pass without checkpointing (bf16, LoRA).

    Per token and layer: about ten hidden-size tensors (norm inputs and outputs, q and attention
    output, o/gate/up inputs, residuals), four key/value-size ones and five MLP-width ones.
    """
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = cfg.hidden_size
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    kv = hidden * (getattr(cfg, "num_key_value_heads", None) or heads) // heads
    mlp = getattr(cfg, "intermediate_size", None) or 4 * hidden
    return tokens * cfg.num_hidden_layers * element_size * (10 * hidden + 4 * kv + 5 * mlp)


def settle_checkpointing(fast: FastPath, model, tokens_per_step: int, device_bytes: int | None = None) -> FastPath:
    """Decide `gradient_checkpointing: auto`: on when weights plus estimated activations exceed the headroom."""
    if fast.gradient_checkpointing is not None:
        return fast
    if device_bytes is None:
        device_bytes = torch.cuda.get_device_properties(0).total_memory
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    needed = weights + activation_bytes(model.config, tokens_per_step)
    on = needed > MEMORY_HEADROOM * device_bytes
    print(
        f"gradient checkpointing {'on' if on else 'off'}: about {needed / 2**30:.1f} GiB without it, "
        f"{device_bytes / 2**30:.1f} GiB on the GPU",
        file=sys.stderr,
        flush=True,
    )
    return dataclasses.replace(fast, gradient_checkpointing=on)


def apply_liger_layers(model) -> None:
    """Liger's RMSNorm, RoPE and SwiGLU kernels on `model` (a transformers model, before peft wraps it)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    # The fused loss is ours (FastSFTTrainer); Liger's own would replace the model's forward.
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )


def set_adapter_dtype(model, dtype: str) -> None:
    """Cast the trainable (adapter) weights to `dtype`; their optimizer state follows."""
    target = getattr(torch, dtype)
    for param in model.parameters():
        if param.requires_grad and param.dtype != target:
            param.data = param.data.to(target)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, `chunk` rows at a time.

    The gradients are computed in the forward pass, chunk by chunk (as Liger's fused kernel
    does), so neither the logits nor their gradient are kept for the backward pass: peak extra
    memory is one (chunk, vocabulary) fp32 block. Rows whose target is -100 contribute nothing.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.t()).float()
            if bias is not None:
                logits = logits + bias.float()
            valid = t != IGNORE_INDEX
            safe_t = t.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            total = total + ((lse - picked) * valid).sum()
            if need_h or need_w or need_b:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0
                grad.mul_(valid[:, None])
                if need_h:
                    grad_h[start : start + chunk] = grad.to(hidden.dtype) @ weight
                if need_w:
                    grad_w += grad.t() @ h.float()
                if need_b:
                    grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
            None if grad_w is None else (grad_w * grad_out).to(w_dtype),
            None if grad_b is None else (grad_b * grad_out).to(b_dtype),
            None,
            None,
        )


def chunked_loss_sum(hidden, weight, bias, targets, chunk: int = 1024) -> torch.Tensor:
    """Pure-torch fused linear cross-entropy (summed over labelled rows): any device."""
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)


def liger_loss_sum(hidden, weight, bias, targets, chunk: int = 0) -> torch.Tensor:
    """Liger Kernel's fused linear cross-entropy (Triton, CUDA), summed over labelled rows."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, targets, bias=bias, reduction="sum")


def causal_lm_loss(hidden, lm_head, labels, num_items_in_batch=None, kind: str = "chunked", chunk: int = 1024):
    """Next-token loss from the final hidden states: only labelled positions meet the LM head.

    Sum over those positions divided by `num_items_in_batch` when given (the trainer's count
    across gradient accumulation and devices), else by their number: the value of the model's
    own `loss` and of TRL's.
    """
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    mask = targets != IGNORE_INDEX
    hidden, targets = hidden[mask], targets[mask]
    loss_sum = liger_loss_sum if kind == "liger" and len(targets) else chunked_loss_sum
    total = loss_sum(hidden, lm_head.weight, lm_head.bias, targets, chunk)
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(count, device=total.device)


def add_fast_loss_head(model, kind: str, chunk: int) -> None:
    """Patch `model` (the transformers model under peft) so that `model(..., tunegate_loss=True)` returns
    only `loss`, computed by `causal_lm_loss`; without the flag the forward is the previous one.

    Going through the model's forward (rather than calling its parts) keeps DDP/FSDP hooks and
    peft's forward hooks in the path.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    previous = model.forward

    @functools.wraps(type(model).forward)  # `generate` checks its kwargs against this signature
    def forward(self, *args, tunegate_loss=False, **kwargs):
        if not tunegate_loss:
            return previous(*args, **kwargs)
        labels = kwargs.pop("labels")
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        head = self.get_output_embeddings()
        loss = causal_lm_loss(hidden.to(head.weight.device), head, labels, num_items, kind, chunk)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)


class FastSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer; with `fast.loss` `liger` or `chunked`, the loss comes from `causal_lm_loss`."""

    def __init__(self, *args, fast: FastPath, **kwargs):
        super().__init__(*args, **kwargs)
        self.fast = fast
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if fast.loss != "trl":
            add_fast_loss_head(base, fast.loss, fast.loss_chunk_tokens)
        set_adapter_dtype(self.model, fast.adapter_dtype)  # SFTTrainer casts QLoRA adapters to bf16 itself

    def _fast_loss_applies(self) -> bool:
        return (
            self.fast.loss != "trl"
            and self.compute_loss_func is None
            and self.label_smoother is None
            and self.args.loss_type == "nll"
            and not self.aux_loss_enabled
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self._fast_loss_applies():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        loss = model(**inputs, tunegate_loss=True, num_items_in_batch=num_items_in_batch).loss
        # As SFTTrainer: `num_items_in_batch` counts every rank's tokens and DDP averages gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self._tp_size)
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:  # padding-free: one row of real tokens
                local = torch.tensor(inputs["input_ids"].size(1), device=inputs["input_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss
