"""`tunegate train`: curated chat data in, a registered LoRA (or QLoRA, or prefix-tuning) adapter out.

TRL's `SFTTrainer` does the training and peft the adapter; this module only decides the recipe:
loss on the final assistant answer only (conversational prompt/completion rows), early stopping
on validation loss, a seed, a run folder named by the config's hash so that running the same
config again after a kill resumes from its last checkpoint, and publication into the adapter
registry with a manifest (base model hash, dataset hash, config hash, seed, metrics, parent).
Multi-GPU: run the same command under `accelerate launch` or `torchrun`
(`deploy/accelerate/fsdp.yaml`); nothing here assumes one process.

The fast path (`training.fastpath`): on a CUDA GPU the loss is computed from hidden states by a
fused or chunked linear cross-entropy, adapters are bf16, AdamW is fused, rows are packed without
padding where the attention kernel allows, and activations are recomputed only when memory asks;
each is a `TrainConfig` switch whose `auto` resolves to the previous behaviour on a CPU.
`build_trainer` is the training step that `bench/gpu_train.py` measures.

Imports torch, transformers, peft, trl, datasets (lazily) and `training` modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from core.io import read_jsonl, sha256_text

if TYPE_CHECKING:  # imported where used: the training step runs without curation's and the registry's deps
    from training.registry import AdapterRegistry, Manifest

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PACKED = ("flash_attention_2", "flex_attention")  # attention kernels that keep padding-free packed rows apart


class TrainingError(Exception):
    """Training cannot run as configured; the message says what to change."""


@dataclass
class TrainConfig:
    """One adapter training run. Every field can be set in the YAML file given to `tunegate train`."""

    name: str = field(metadata={"help": "Adapter name in the registry (the alias routes use, e.g. `support`)."})
    train_file: Path = field(metadata={"help": "Curated chat JSONL (`messages`), e.g. from `tunegate data curate`."})
    validation_file: Path | None = field(
        default=None, metadata={"help": "Validation JSONL; enables early stopping on validation loss."}
    )
    base_model: str = field(
        default="embedded",
        metadata={"help": "`embedded` (the bootstrap model) or a Hugging Face model folder."},
    )
    method: Literal["lora", "qlora", "prefix"] = field(
        default="lora",
        metadata={"help": "`lora`, `qlora` (4-bit base, needs a CUDA GPU) or `prefix` tuning."},
    )
    target_modules: list[str] = field(
        default_factory=lambda: list(ALL_LINEAR), metadata={"help": "Linear layers LoRA adapts."}
    )
    r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path."})
    num_virtual_tokens: int = field(default=16, metadata={"help": "Virtual tokens for `prefix` tuning."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate (cosine schedule)."})
    max_steps: int = field(default=400, metadata={"help": "Optimizer steps (the compute budget)."})
    batch_size: int = field(default=32, metadata={"help": "Sequences per device per step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per step."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps spent warming up."})
    eval_steps: int = field(default=50, metadata={"help": "Steps between validation (and checkpoints)."})
    early_stopping_patience: int = field(
        default=3,
        metadata={"help": "Evaluations without a better validation loss before stopping; 0 disables."},
    )
    gradient_checkpointing: bool | Literal["auto"] = field(
        default="auto",
        metadata={
            "help": "Recompute activations in the backward pass: less memory, one more forward pass per step. "
            "`auto`: on a CUDA GPU when the weights plus a batch's estimated activations exceed 90% of its "
            "memory; off on a CPU."
        },
    )
    loss: Literal["auto", "liger", "chunked", "trl"] = field(
        default="auto",
        metadata={
            "help": "Loss kernel. `liger`: Liger Kernel's fused linear cross-entropy (CUDA, `pip install "
            "liger-kernel`); `chunked`: tunegate's pure-torch chunked one (any device); both compute the loss "
            "from hidden states so the full-vocabulary logits never exist at once. `trl`: SFTTrainer's own. "
            "`auto`: `liger` on CUDA when installed, else `chunked` on CUDA; `trl` on a CPU and for `prefix`."
        },
    )
    loss_chunk_tokens: int = field(
        default=1024,
        metadata={"help": "Tokens per chunk of the `chunked` loss: one (chunk, vocabulary) fp32 block at a time."},
    )
    liger_layers: bool | Literal["auto"] = field(
        default="auto",
        metadata={
            "help": "Liger Kernel's RMSNorm, RoPE and SwiGLU kernels (CUDA, supported model types). "
            "`auto`: on when `liger-kernel` is installed and there is a CUDA GPU."
        },
    )
    padding_free: bool | Literal["auto"] = field(
        default="auto",
        metadata={
            "help": "Pack variable-length rows without padding (best-fit into `max_length`-token rows); needs "
            "attention that keeps packed rows apart (`flash_attention_2`, `flex_attention`). `auto`: on when "
            "`attn_implementation` resolves to one of them."
        },
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = field(
        default="auto",
        metadata={
            "help": "Attention kernel. `auto`: `flash_attention_2` on CUDA when `flash-attn` is installed, "
            "else transformers' default (`sdpa`)."
        },
    )
    adapter_dtype: Literal["auto", "bfloat16", "float32"] = field(
        default="auto",
        metadata={
            "help": "dtype of the LoRA weights and their optimizer state. `auto`: `bfloat16` on CUDA (no fp32 "
            "copies of activations on the adapter path), `float32` on a CPU."
        },
    )
    optimizer: Literal["adamw_torch_fused", "adamw_torch"] = field(
        default="adamw_torch_fused",
        metadata={"help": "AdamW kernel: `adamw_torch_fused` (one fused kernel per step) or `adamw_torch`."},
    )
    max_length: int = field(default=256, metadata={"help": "Longest tokenized example kept (tokens)."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, dropout and data order."})
    parent_version: str | None = field(default=None, metadata={"help": "Registry version this one improves on."})
    run_dir: Path | None = field(
        default=None,
        metadata={"help": "Checkpoints and logs; default `<var_dir>/runs/<name>-<config hash>`."},
    )
    publish: bool = field(default=True, metadata={"help": "Register the adapter when training ends."})

    def __post_init__(self) -> None:
        self.train_file = Path(self.train_file)
        self.validation_file = Path(self.validation_file) if self.validation_file else None
        self.run_dir = Path(self.run_dir) if self.run_dir else None
        if self.method not in ("lora", "qlora", "prefix"):
            raise ValueError(f"`method` is {self.method!r}; use `lora`, `qlora` or `prefix`")
        if self.r < 1:
            raise ValueError(f"`r` is {self.r}; the LoRA rank must be a positive integer such as 8 or 16")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"`lora_dropout` is {self.lora_dropout}; use a value in [0, 1)")
        if self.learning_rate <= 0 or self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("`learning_rate`, `max_steps` and `batch_size` must be positive")
        if not self.target_modules and self.method != "prefix":
            raise ValueError("`target_modules` is empty; name the linear layers to adapt, e.g. q_proj, v_proj")
        if not self.name or "/" in self.name:
            raise ValueError(f"`name` {self.name!r} must be a non-empty name without `/`")
        self._check_fast_path()

    def _check_fast_path(self) -> None:
        for key in ("gradient_checkpointing", "liger_layers", "padding_free"):
            if not (getattr(self, key) is True or getattr(self, key) is False or getattr(self, key) == "auto"):
                raise ValueError(f"`{key}` is {getattr(self, key)!r}; use true, false or auto")
        choices = {
            "loss": ("auto", "liger", "chunked", "trl"),
            "attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention"),
            "adapter_dtype": ("auto", "bfloat16", "float32"),
            "optimizer": ("adamw_torch_fused", "adamw_torch"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                names = [f"`{a}`" for a in allowed]
                raise ValueError(f"`{key}` is {getattr(self, key)!r}; use {', '.join(names[:-1])} or {names[-1]}")
        if type(self.loss_chunk_tokens) is not int or self.loss_chunk_tokens < 1:
            raise ValueError(
                f"`loss_chunk_tokens` is {self.loss_chunk_tokens!r}; use a positive number of tokens such as 1024"
            )
        if self.method == "prefix" and self.loss in ("liger", "chunked"):
            raise ValueError(
                f"`loss` is `{self.loss}`, which needs a LoRA model; with `method: prefix` use `loss: trl` or `auto`"
            )
        if self.padding_free is True and (self.method == "prefix" or self.attn_implementation not in PACKED):
            raise ValueError(
                "`padding_free` is true, which needs `method: lora` or `qlora` and attention that keeps packed rows "
                "apart: set `attn_implementation: flash_attention_2` or `flex_attention`, or `padding_free: auto`"
            )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown training setting(s) {', '.join(f'`{k}`' for k in unknown)}; known: {', '.join(sorted(known))}"
            )
        missing = [k for k in ("name", "train_file") if k not in data]
        if missing:
            raise ValueError(f"missing {', '.join(f'`{k}`' for k in missing)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: Path) -> TrainConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping of training settings")
        base = Path(path).parent
        for key in ("train_file", "validation_file", "run_dir"):  # relative to the config file
            if data.get(key) and not Path(data[key]).is_absolute():
                data[key] = str(base / data[key])
        return cls.from_dict(data)

    def save(self, path: Path) -> Path:
        """Write the config as YAML that `from_yaml` reads back equal (paths are written absolute)."""
        data = self.to_dict()
        for key in ("train_file", "validation_file", "run_dir"):
            if data.get(key):
                data[key] = str(Path(data[key]).resolve())
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
        return Path(path)

    def config_hash(self) -> str:
        recipe = {k: v for k, v in self.to_dict().items() if k not in ("run_dir", "publish", "parent_version")}
        return sha256_text(json.dumps(recipe, sort_keys=True))[:16]


@dataclass
class TrainResult:
    adapter_dir: Path  # the peft folder in the run dir
    manifest: Manifest | None  # the registered manifest (None when not published)
    registry_path: Path | None
    metrics: dict[str, float]
    trainable_params: int
    total_params: int
    resumed_from: str | None

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params


def read_chat_rows(path: Path) -> list[dict]:
    """Conversational prompt/completion rows: the last assistant turn is what the loss trains."""
    rows = []
    for line_no, row in read_jsonl(path, TrainingError):
        messages = row["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise TrainingError(f"{path}:{line_no}: the last message must be the assistant's; curate the data first")
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    if not rows:
        raise TrainingError(f"{path}: no training rows")
    return rows


def _check_qlora() -> None:
    import torch

    if not torch.cuda.is_available():
        raise TrainingError(
            "QLoRA (`method: qlora`) needs a CUDA GPU for bitsandbytes' 4-bit kernels and this machine has "
            "none; use `method: lora` here, or run on a GPU machine with `pip install -e .[gpu]`"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise TrainingError("QLoRA needs bitsandbytes: `pip install -e .[gpu]`") from err


def peft_config(config: TrainConfig):
    from peft import LoraConfig, PrefixTuningConfig, TaskType

    if config.method == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.num_virtual_tokens)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        bias="none",
    )


def load_base(path: Path, method: str, attn_implementation: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )  # fmt: skip
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": 0}, **attn)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **attn)


def prepare_model(base, config: TrainConfig, fast):
    """The base model with Liger's layer kernels (when chosen) and the peft adapter in `fast.adapter_dtype`."""
    from peft import get_peft_model

    from training.fastpath import apply_liger_layers, set_adapter_dtype

    if fast.liger_layers:
        apply_liger_layers(base)
    # peft's default upcasts adapters to fp32; with bf16 adapters they stay in the base model's dtype.
    model = get_peft_model(base, peft_config(config), autocast_adapter_dtype=fast.adapter_dtype == "float32")
    if config.method != "prefix":
        set_adapter_dtype(model, fast.adapter_dtype)
    return model


def sft_args(
    config: TrainConfig, fast, output_dir: Path, use_eval: bool = False, progress: bool = True, **overrides
):  # fmt: skip
    """TRL's `SFTConfig` for `config` as resolved in `fast` (`fast.gradient_checkpointing` settled);
    `overrides` replace single arguments (the benchmark logs every step and saves nothing)."""
    from trl import SFTConfig

    cuda = fast.device == "cuda"
    args = dict(
        output_dir=str(output_dir),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(config.warmup_ratio * config.max_steps)),
        weight_decay=0.0,
        optim=fast.optimizer,
        logging_steps=config.eval_steps,
        eval_strategy="steps" if use_eval else "no",
        eval_steps=config.eval_steps if use_eval else None,
        save_strategy="steps",
        save_steps=config.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=use_eval,
        metric_for_best_model="eval_loss" if use_eval else None,
        greater_is_better=False if use_eval else None,
        # The fast loss needs no logits at evaluation either (no metrics are computed from them).
        prediction_loss_only=fast.loss != "trl",
        completion_only_loss=True,
        max_length=config.max_length,
        packing=fast.padding_free,
        packing_strategy="bfd",
        padding_free=fast.padding_free,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        disable_tqdm=not progress,
        use_cpu=not cuda,
        bf16=cuda,
        dataloader_num_workers=0,
        gradient_checkpointing=bool(fast.gradient_checkpointing),
        dataset_num_proc=None,
    )
    return SFTConfig(**(args | overrides))


def build_trainer(
    config: TrainConfig, fast, model, tokenizer, train_ds, eval_ds=None, output_dir: Path | None = None,
    progress: bool = True, callbacks=(), **overrides,
):  # fmt: skip
    """The training step of `tunegate train`: TRL's SFTTrainer with the fast path `fast` resolved for `model`.

    `model` comes from `prepare_model`. `bench/gpu_train.py` times exactly this trainer.
    """
    from training.fastpath import FastSFTTrainer, settle_checkpointing

    fast = settle_checkpointing(fast, model, config.batch_size * config.max_length)
    args = sft_args(config, fast, output_dir or Path("checkpoints"), eval_ds is not None, progress, **overrides)
    return FastSFTTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        callbacks=list(callbacks), fast=fast,
    )  # fmt: skip


def last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest checkpoint a kill did not cut short, or None.

    The trainer writes `trainer_state.json` last; a checkpoint folder without it (or with half of it)
    is what a kill in the middle of saving leaves, and resuming from it fails. transformers'
    `get_last_checkpoint` only looks at folder names, so it would pick that one."""
    complete = []
    for folder in checkpoints.glob("checkpoint-*"):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            complete.append((int(folder.name.removeprefix("checkpoint-")), folder))
        except (OSError, ValueError):
            continue
    return str(max(complete)[1]) if complete else None


def train_adapter(
    config: TrainConfig,
    base_path: Path,
    var_dir: Path,
    registry: AdapterRegistry | None = None,
    progress=True,
) -> TrainResult:
    """Train one adapter as `config` says; resume its run if it was interrupted; publish it."""
    from datasets import Dataset
    from transformers import AutoTokenizer, EarlyStoppingCallback, set_seed

    from training.base_model import model_hash
    from training.curation import dataset_hash
    from training.registry import Manifest

    if config.method == "qlora":
        _check_qlora()
    for path in (config.train_file, config.validation_file):
        if path and not path.exists():
            raise TrainingError(
                f"`{'train_file' if path == config.train_file else 'validation_file'}` {path} does not exist"
            )
    from training.fastpath import FastPathError, resolve_fast_path

    try:
        fast = resolve_fast_path(config)
    except FastPathError as err:
        raise TrainingError(str(err)) from err
    set_seed(config.seed)
    # Named by recipe and data: the same command after a kill resumes; new data at the same path does not.
    data_hash = dataset_hash(config.train_file)[:8]
    run_dir = config.run_dir or var_dir / "runs" / f"{config.name}-{config.config_hash()}-{data_hash}"
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = prepare_model(load_base(base_path, config.method, fast.attn_implementation), config, fast)
    trainable, total = model.get_nb_trainable_parameters()
    # `progress=False` is a caller that tells its own story (the demo): no bar, no log lines from here.
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None)
    say(f"trainable params: {trainable:,} of {total:,} ({trainable / total:.4%})")

    train_ds = Dataset.from_list(read_chat_rows(config.train_file))
    eval_ds = Dataset.from_list(read_chat_rows(config.validation_file)) if config.validation_file else None
    use_eval = eval_ds is not None
    callbacks = []
    if use_eval and config.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    trainer = build_trainer(config, fast, model, tokenizer, train_ds, eval_ds, checkpoints, progress, callbacks)
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # without a bar, the trainer prints every log as a dict
    say(f"fast path: {json.dumps(trainer.fast.describe())}")
    last = last_complete_checkpoint(checkpoints)
    if last:
        say(f"resuming from {last}")
    # The trainer prints its logs on stdout; stdout is for results (`--json`), so they go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        output = trainer.train(resume_from_checkpoint=last)
    metrics = {"train_loss": float(output.training_loss), "steps": float(trainer.state.global_step)}
    if use_eval:
        metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    adapter_dir = run_dir / "adapter"
    trainer.model.save_pretrained(adapter_dir)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))

    manifest = registry_path = None
    if config.publish and registry is not None:
        manifest = Manifest(
            name=config.name,
            version=registry.next_version(config.name),
            base_model=config.base_model if config.base_model != "embedded" else base_path.name,
            base_model_hash=model_hash(base_path),
            dataset_hash=dataset_hash(config.train_file),
            config_hash=config.config_hash(),
            seed=config.seed,
            metrics=metrics,
            parent_version=config.parent_version,
            trainable_params=int(trainable),
            total_params=int(total),
        )
        # Prefix tuning trains, but vLLM cannot serve it: registered as unservable, with the reason.
        registry_path = registry.publish(adapter_dir, manifest, allow_unservable=config.method == "prefix")
        manifest = registry.get(config.name, manifest.version)
    return TrainResult(
        adapter_dir,
        manifest,
        registry_path,
        metrics,
        int(trainable),
        int(total),
        os.path.basename(last) if last else None,
    )
