"""Training speed of `tunegate train`'s own step beside plain TRL + peft, on one accelerator, in one run.

Both sides train the same random-weight model (Llama-3-8B's shape by default: vocabulary 128256,
32 layers, GQA 32/8), on the same random token rows (sequence 2048, no padding), with the same
batch, LoRA (r=16, alpha 32, all seven linear kinds), bf16 mixed precision, learning-rate schedule
and optimizer class (fused AdamW on CUDA), for `lora` (bf16 base) and `qlora` (NF4 base):

    plain     TRL's `SFTTrainer(model, peft_config=LoraConfig(...))` with its own defaults
              (its chunked log-prob LM head, fp32 adapters, gradient checkpointing on)
    tunegate  `training.sft.prepare_model` + `training.sft.build_trainer`: the trainer that
              `tunegate train` runs, with every fast-path switch at `auto` (imported, not copied)

It prints one JSON object: per setting and side tokens/s, peak GiB, MFU, the per-step losses,
the fast-path choices, and `speedup`, `memory_ratio` and whether the losses agree over the
steps; `--plot` writes a PNG of the same. On CUDA each run is a fresh process (Liger's kernels
patch transformers' Llama module for the whole process; peak memory counts one run only).

    python -m bench.gpu_train --out r.json --plot r.png   # on a GPU (bench/gpu_all.sh DIR does it all)
    python -m bench.gpu_train --shape tiny --steps 2       # the same code on a CPU in seconds (tests)

On a CPU the `auto` loss is SFTTrainer's own, so the tiny run asks for tunegate's `chunked` loss;
`--set KEY=VALUE` sets any other fast-path switch of tunegate's side (ablations).
MFU counts 4 FLOPs per weight per token (forward, and the backward to the activations: the base
is frozen) plus attention, against the GPU's dense bf16 peak from its datasheet (`--peak-tflops`);
recomputation under gradient checkpointing is not counted as useful work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

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
DEFAULT_SEQ = {"llama3-8b": 2048, "tiny": 64}
# Dense bf16 peak of the GPU (vendor datasheet, TFLOP/s): hardware, not anyone's measurement.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
TARGET_SPEEDUP, TARGET_MEMORY = 1.5, 0.5  # the targets: >= 1.5x plain's tokens/s at <= half its peak
LOSS_RTOL = 0.02  # both sides' per-step losses must agree within 2% (bf16 vs fp32 adapters, other kernels)
REPO = Path(__file__).resolve().parent.parent
FAST_SWITCHES = (
    "loss", "loss_chunk_tokens", "liger_layers", "padding_free", "attn_implementation", "adapter_dtype",
    "optimizer", "gradient_checkpointing",
)  # fmt: skip


def tiny_tokenizer():
    """A tokenizer for pre-tokenized rows: SFTTrainer needs one for its pad and EOS tokens only."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
    )  # fmt: skip


def token_rows(vocab: int, seq: int, rows: int, seed: int = 0):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, seq), generator=gen)
    return Dataset.from_dict({"input_ids": ids.tolist()})


def quantize_nf4(model, dtype) -> None:
    """Swap the decoder's linear layers for bitsandbytes NF4 ones, as `load_base(..., "qlora")` loads them
    (NF4, double quantization, bf16 compute); random weights have no checkpoint to load from."""
    import bitsandbytes as bnb

    from training.sft import ALL_LINEAR

    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name in ALL_LINEAR:
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                    quant_type="nf4", compress_statistics=True, device="meta",
                )  # fmt: skip
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True, module=q
                )
                setattr(parent, name, q.to(child.weight.device))  # quantizes on the GPU
    # As `from_pretrained(..., quantization_config=..., device_map={"": 0})` leaves it: TRL and peft
    # treat the model as QLoRA, and the trainer does not move it.
    model.is_loaded_in_4bit = True
    model.hf_device_map = {"": 0}
    torch.cuda.empty_cache()


def random_model(shape: str, method: str, cuda: bool, attn: str | None = None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    kwargs = {"attn_implementation": attn} if attn else {}
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, **kwargs)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if method == "qlora":
        quantize_nf4(model, dtype)
    return model


def model_flops_per_token(cfg, seq: int) -> float:
    """Useful FLOPs per trained token: 4 per linear weight (forward, backward to activations) + attention."""
    h, i, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    linear = layers * (h * (h + 2 * kv) + h * h + 3 * h * i) + h * vocab
    return 4 * linear + 12 * layers * h * seq  # attention: QK^T and AV, forward and backward (PaLM's count)


def step_timer(warmup: int, cuda: bool):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of the steps after `warmup`, peak memory from the start of training, per-step losses."""

        def __init__(self):
            self.start = self.end = None
            self.losses: list[float] = []

        def _now(self) -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.start = self._now()
            if state.global_step == state.max_steps:
                self.end = self._now()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def run_one(side: str, method: str, opts: dict) -> dict:
    """One training run of `side` ("plain" or "tunegate"): build, train warmup + steps, measure."""
    from trl import SFTConfig, SFTTrainer

    from training.fastpath import resolve_fast_path, settle_checkpointing
    from training.sft import TrainConfig, build_trainer, peft_config, prepare_model

    cuda = torch.cuda.is_available()
    shape, batch, seq, steps, warmup = opts["shape"], opts["batch"], opts["seq"], opts["steps"], opts["warmup"]
    config = TrainConfig(
        name="bench", train_file=Path("random-tokens"), method=method, r=16, lora_alpha=32, lora_dropout=0.0,
        batch_size=batch, max_length=seq, max_steps=warmup + steps, learning_rate=opts["lr"], warmup_ratio=0.0,
        **opts["switches"],
    )  # fmt: skip
    fast = resolve_fast_path(config)
    model = random_model(shape, method, cuda, fast.attn_implementation if side == "tunegate" else None)
    data = token_rows(SHAPES[shape]["vocab_size"], seq, batch * (warmup + steps))
    timer = step_timer(warmup, cuda)
    out = tempfile.mkdtemp(prefix=f"gpu-train-{side}-")
    common = dict(logging_steps=1, save_strategy="no", disable_tqdm=True)
    if side == "tunegate":
        trainer = build_trainer(
            config, fast, prepare_model(model, config, fast), tiny_tokenizer(), data, output_dir=Path(out),
            progress=False, callbacks=[timer], **common,
        )  # fmt: skip
        checkpointing, described = trainer.fast.gradient_checkpointing, trainer.fast.describe()
    else:
        checkpointing = True  # TRL's own default
        if opts["baseline_checkpointing"] == "same":
            checkpointing = bool(settle_checkpointing(fast, model, batch * seq).gradient_checkpointing)
        args = SFTConfig(
            output_dir=out, max_steps=config.max_steps, per_device_train_batch_size=batch,
            learning_rate=config.learning_rate, lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.0,
            optim=fast.optimizer, bf16=cuda, use_cpu=not cuda, max_length=seq, seed=0, data_seed=0,
            report_to=[], dataloader_num_workers=0, gradient_checkpointing=checkpointing, **common,
        )  # fmt: skip
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer(),
            peft_config=peft_config(config), callbacks=[timer],
        )  # fmt: skip
        described = None
    trainer.train()
    seconds = timer.end - timer.start
    tokens_per_s = batch * seq * steps / seconds
    result = {
        "tokens_per_s": round(tokens_per_s, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "mfu": None,
        "seconds_per_step": round(seconds / steps, 4),
        "losses": timer.losses,
        "batch": batch,
        "seq": seq,
        "gradient_checkpointing": bool(checkpointing),
        "adapter_dtype": str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad)),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    peak = opts.get("peak_tflops")
    if peak:
        result["mfu"] = round(model_flops_per_token(model.config, seq) * tokens_per_s / (peak * 1e12), 4)
    if described:
        result["fast_path"] = described
    return result


def _isolated(side: str, method: str, opts: dict) -> dict:
    """`run_one` in a fresh Python process; its result comes back through a file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result.json"
        spec = json.dumps({"side": side, "method": method, "opts": opts, "result": str(path)})
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(
            [sys.executable, "-m", "bench.gpu_train", "--one", spec], cwd=REPO, env=env, stdout=sys.stderr
        )
        if proc.returncode != 0 or not path.exists():
            return {"error": f"run exited with {proc.returncode}; its log is above on stderr"}
        return json.loads(path.read_text())


def compare(plain: dict, ours: dict) -> dict:
    """Speed-up, memory ratio and loss agreement of one setting."""
    pairs = list(zip(plain["losses"], ours["losses"], strict=False))
    diffs = [abs(a - b) / max(abs(a), 1e-6) for a, b in pairs]
    summary = {
        "speedup": round(ours["tokens_per_s"] / plain["tokens_per_s"], 3),
        "memory_ratio": round(ours["peak_gib"] / plain["peak_gib"], 3) if plain["peak_gib"] else None,
        "losses_compared": len(pairs),
        "max_loss_rel_diff": round(max(diffs), 6) if diffs else None,
        "losses_agree": bool(pairs) and max(diffs) <= LOSS_RTOL,
    }
    if summary["memory_ratio"] is not None:  # on a GPU; CPU timings say nothing about the targets
        summary["meets_speed_target"] = summary["speedup"] >= TARGET_SPEEDUP
        summary["meets_memory_target"] = summary["memory_ratio"] <= TARGET_MEMORY
    return summary


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s, r in results["runs"].items() if "plain" in r and "tunegate" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.38
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s"), (axes[1], "peak_gib", "peak GiB")):
        for k, side in enumerate(("plain", "tunegate")):
            values = [results["runs"][s][side].get(key) or 0 for s in settings]
            ax.bar([x + (k - 0.5) * width for x in range(len(settings))], values, width, label=side)
        ax.set_xticks(range(len(settings)), settings)
        ax.set_title(label if results["device"] != "cpu" or key != "peak_gib" else f"{label} (CUDA only)")
        ax.legend()
    for s in settings:
        for side, style in (("plain", "-"), ("tunegate", "--")):
            losses = results["runs"][s][side]["losses"]
            axes[2].plot(range(1, len(losses) + 1), losses, style, label=f"{s} {side}")
    axes[2].set_title("training loss per step")
    axes[2].set_xlabel("step")
    axes[2].legend()
    fig.suptitle(f"tunegate train vs plain TRL + peft: {results['shape']}, seq {results['seq']}, {results['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "trl", "peft", "liger-kernel", "bitsandbytes", "flash-attn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--seq", type=int, help="Tokens per row (default: 2048; 64 for `tiny`).")
    parser.add_argument("--batch", type=int, default=8, help="Rows per step, both sides.")
    parser.add_argument("--steps", type=int, default=6, help="Timed steps per run.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first (kernel autotuning, caches).")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--settings", default="lora,qlora", help="Comma-separated: lora, qlora.")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="A tunegate `TrainConfig` fast-path switch, e.g. `--set liger_layers=false` (repeatable).",
    )  # fmt: skip
    parser.add_argument(
        "--baseline-checkpointing", choices=["trl", "same"], default="trl",
        help="`trl`: TRL's default (on); `same`: whatever tunegate's `auto` chooses.",
    )  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, help="The GPU's dense bf16 peak (default: from its name).")
    parser.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto", help="A process per run.")
    parser.add_argument("--out", type=Path, help="Also write the JSON to this file.")
    parser.add_argument("--plot", type=Path, help="Write the plot (PNG) here.")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one isolated run
    args = parser.parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        with contextlib.redirect_stdout(sys.stderr):
            result = run_one(spec["side"], spec["method"], spec["opts"])
        Path(spec["result"]).write_text(json.dumps(result))
        return result

    cuda = torch.cuda.is_available()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    switches = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in FAST_SWITCHES:
            parser.error(f"--set {item!r}: use KEY=VALUE with KEY one of {', '.join(FAST_SWITCHES)}")
        switches[key] = yaml.safe_load(value)
    if not cuda:  # the CPU's `auto` loss is SFTTrainer's own: ask for tunegate's, so the tiny run exercises it
        switches.setdefault("loss", "chunked")
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if cuda and k in device), None)
    opts = {
        "shape": args.shape, "seq": args.seq or DEFAULT_SEQ[args.shape], "batch": args.batch, "steps": args.steps,
        "warmup": args.warmup, "lr": args.lr, "switches": switches, "peak_tflops": peak,
        "baseline_checkpointing": args.baseline_checkpointing,
    }  # fmt: skip
    isolate = args.isolate == "yes" or (args.isolate == "auto" and cuda)
    results: dict = {"device": device, "shape": args.shape, "seq": opts["seq"], "batch": args.batch}
    results |= {"steps": args.steps, "warmup": args.warmup, "peak_bf16_tflops": peak, "versions": versions()}
    results["runs"] = {}
    for method in args.settings.split(","):
        if method == "qlora" and not cuda:
            results["runs"][method] = {"skipped": "QLoRA's NF4 kernels (bitsandbytes) need a CUDA GPU"}
            continue
        runs: dict = {}
        for side in ("plain", "tunegate"):
            try:
                if isolate:
                    runs[side] = _isolated(side, method, opts)
                else:
                    with contextlib.redirect_stdout(sys.stderr):
                        runs[side] = run_one(side, method, opts)
            except Exception as err:  # one failed run must not hide the others' numbers
                runs[side] = {"error": f"{type(err).__name__}: {err}"}
            print(json.dumps({method: {side: runs[side]}}), file=sys.stderr, flush=True)
        if all("tokens_per_s" in runs[side] for side in runs):
            runs |= compare(runs["plain"], runs["tunegate"])
        results["runs"][method] = runs
        if args.out:  # what is done so far survives a run cut short
            args.out.write_text(json.dumps(results, indent=2))
    if args.plot:
        results["plot"] = str(plot(results, args.plot))
    print(json.dumps(results), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
