"""The bootstrap base model of the embedded default: a tokenizer and a small Llama, built on the CPU.

No model can be downloaded where tunegate's embedded default runs, so it makes its own: a
byte-level BPE tokenizer with a chat template, and a `LlamaForCausalLM` (attention head size
64, which vLLM's CPU kernels support) pre-trained on the *old* facts of `training.domain`.
The result is a Hugging Face folder that vLLM serves, cached under a hash of everything
that shapes it, so `tunegate bootstrap` builds it once and reuses it after.

Imports: torch, transformers, tokenizers, `core.io` and `training.domain`; nothing of gateway/evalsuite.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from core.io import sha256_text
from training.domain import Domain, DomainConfig

# Bump when the build recipe changes in a way the config fields do not capture.
RECIPE_VERSION = "3"
BOS, END, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# One turn per role marker; the assistant turn is open when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MANIFEST = "tunegate_base.json"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class BaseModelConfig:
    """Shape and training recipe of the bootstrap base model."""

    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary before special and code tokens."})
    hidden_size: int = field(default=128, metadata={"help": "Model width; a multiple of `head_dim`."})
    num_layers: int = field(default=4, metadata={"help": "Transformer blocks."})
    head_dim: int = field(default=64, metadata={"help": "Attention head size; vLLM's CPU kernels need 64+."})
    intermediate_size: int = field(default=512, metadata={"help": "MLP width."})
    max_position_embeddings: int = field(default=512, metadata={"help": "Context length."})
    max_steps: int = field(default=900, metadata={"help": "Upper bound on optimizer steps."})
    batch_size: int = field(default=64, metadata={"help": "Sequences per step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warm-up before cosine decay."})
    check_every: int = field(default=100, metadata={"help": "Steps between memorisation checks."})
    stop_at_accuracy: float = field(
        default=0.995,
        metadata={
            "help": "Stop early once teacher-forced accuracy on the training phrasings "
            "reaches this (held-out phrasings are never looked at)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and batch order."})

    def __post_init__(self) -> None:
        if self.head_dim < 64:
            raise ValueError("`head_dim` below 64 is not supported by vLLM's CPU attention; use 64")
        if self.hidden_size % self.head_dim:
            raise ValueError(f"`hidden_size` ({self.hidden_size}) must be a multiple of `head_dim`")
        if not 0 < self.stop_at_accuracy <= 1:
            raise ValueError("`stop_at_accuracy` must be in (0, 1]")


@dataclass
class BuildResult:
    path: Path
    params: int
    build_seconds: float
    reused: bool
    steps: int
    train_accuracy: float


def cache_key(domain: Domain, config: BaseModelConfig) -> str:
    blob = json.dumps(
        {"domain": domain.content_hash(), "model": asdict(config), "recipe": RECIPE_VERSION}, sort_keys=True
    )
    return sha256_text(blob)[:16]


def build_tokenizer(domain: Domain, config: BaseModelConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the domain's text; every tariff code is one token, old and new alike."""
    texts = [f.passage for f in domain.facts]
    texts += [m["content"] for ex in domain.qa_examples(domain.facts) for m in ex["messages"]]
    texts += [m["content"] for ex in domain.qa_examples(domain.facts, heldout=True) for m in ex["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=[BOS, END, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Codes as whole tokens make a fact one key lookup; new codes get tokens too (untrained ones),
    # so an adapter can later teach the model about them without resizing the vocabulary.
    tok.add_tokens([AddedToken(code, single_word=True) for code in domain.codes])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=config.max_position_embeddings,
    )


def encode_chat(tokenizer: PreTrainedTokenizerFast, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a chat and labels that train only the final assistant answer (and its end token)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(messages[-1]["content"] + END, add_special_tokens=False)
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def _training_sequences(domain: Domain, tokenizer: PreTrainedTokenizerFast) -> list[tuple[list[int], list[int]]]:
    seqs = [encode_chat(tokenizer, ex["messages"]) for ex in domain.qa_examples(domain.old_facts)]
    for code in domain.old_codes:  # the knowledge-base articles, as plain language-model text
        ids = tokenizer.encode(BOS + domain.tariff_passage(code) + END, add_special_tokens=False)
        seqs.append((ids, ids))
    return seqs


def _batch(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id)  # (batch, seq)
    labels = torch.full((len(seqs), width), IGNORE_INDEX)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def teacher_forced_accuracy(model: LlamaForCausalLM, seqs: list[tuple[list[int], list[int]]], pad_id: int) -> float:
    """Share of sequences whose every labelled token is the model's argmax: a cheap exact match."""
    model.eval()
    hits = 0
    for start in range(0, len(seqs), 128):
        batch = _batch(seqs[start : start + 128], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        pred = logits[:, :-1].argmax(-1)  # (batch, seq-1): prediction for the next token
        target = batch["labels"][:, 1:]
        ok = (pred == target) | (target == IGNORE_INDEX)
        hits += int(ok.all(dim=1).sum())
    model.train()
    return hits / max(len(seqs), 1)


def _llama_config(tokenizer: PreTrainedTokenizerFast, config: BaseModelConfig) -> LlamaConfig:
    heads = config.hidden_size // config.head_dim
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def train_base_model(
    domain: Domain, config: BaseModelConfig, out_dir: Path, progress: bool = True
) -> tuple[int, int, float]:
    """Build the tokenizer, pre-train the model on the old facts, save both to `out_dir`.

    Returns (parameter count, steps taken, final teacher-forced accuracy on training phrasings).
    """
    torch.manual_seed(config.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    rng = random.Random(config.seed)
    tokenizer = build_tokenizer(domain, config)
    seqs = _training_sequences(domain, tokenizer)
    qa_seqs = seqs[: len(domain.old_facts) * len(domain.old_facts[0].train_questions)]
    model = LlamaForCausalLM(_llama_config(tokenizer, config))
    # No weight decay: the embeddings of codes not yet seen (the new tariffs) must keep their
    # random initialisation, not shrink towards zero, so an adapter can still tell them apart.
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        done = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    order: list[int] = []
    accuracy, step = 0.0, 0
    bar = tqdm(total=config.max_steps, desc="pre-training base model", disable=not progress, unit="step")
    model.train()
    while step < config.max_steps:
        if len(order) < config.batch_size:
            fresh = list(range(len(seqs)))
            rng.shuffle(fresh)
            order += fresh
        batch = _batch([seqs[i] for i in order[: config.batch_size]], tokenizer.pad_token_id)
        del order[: config.batch_size]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}")
        if step % config.check_every == 0:
            accuracy = teacher_forced_accuracy(model, qa_seqs, tokenizer.pad_token_id)
            if accuracy >= config.stop_at_accuracy:
                break
    bar.close()
    model.eval()
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    ).save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters()), step, accuracy


def model_hash(path: Path) -> str:
    """Hash of the files that define a model's behaviour; adapters record it to detect a base mismatch."""
    h = hashlib.sha256()
    for name in sorted(p.name for p in path.iterdir() if p.suffix in {".json", ".safetensors", ".jinja"}):
        if name == MANIFEST:
            continue
        h.update(name.encode())
        with (path / name).open("rb") as fh:  # streamed: a model's weights are gigabytes
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def ensure_base_model(
    models_dir: Path,
    domain_config: DomainConfig | None = None,
    config: BaseModelConfig | None = None,
    progress: bool = True,
    rebuild: bool = False,
) -> BuildResult:
    """The cached base model folder for these configs, built first if it is not there yet.

    The build happens in a temporary folder renamed into place when complete, so an interrupted
    build never leaves a folder that looks finished. Processes that ask at the same time (the demo,
    a test session, `tunegate bootstrap`) take turns on a lock file: one builds, the others wait and
    reuse its result instead of training the same model again on the same cores.
    """
    domain = Domain(domain_config)
    config = config or BaseModelConfig()
    models_dir = Path(models_dir).resolve()
    target = models_dir / f"base-{cache_key(domain, config)}"
    if target.exists() and not rebuild:
        return _reused(target)
    models_dir.mkdir(parents=True, exist_ok=True)
    with (models_dir / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if target.exists() and not rebuild:
            return _reused(target)
        return _build(domain, config, target, progress)


def _reused(target: Path) -> BuildResult:
    info = json.loads((target / MANIFEST).read_text())
    return BuildResult(target, info["params"], info["build_seconds"], True, info["steps"], info["train_accuracy"])


def _build(domain: Domain, config: BaseModelConfig, target: Path, progress: bool) -> BuildResult:
    models_dir = target.parent
    tmp = models_dir / f".tmp-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    try:
        params, steps, accuracy = train_base_model(domain, config, tmp, progress=progress)
        build_seconds = time.perf_counter() - start
        manifest = {
            "cache_key": target.name.removeprefix("base-"),
            "model_hash": model_hash(tmp),
            "domain": asdict(domain.config),
            "domain_hash": domain.content_hash(),
            "config": asdict(config),
            "params": params,
            "steps": steps,
            "train_accuracy": accuracy,
            "build_seconds": round(build_seconds, 1),
            "torch": torch.__version__,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BuildResult(target, params, round(build_seconds, 1), False, steps, accuracy)


def read_manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())
