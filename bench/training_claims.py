"""The claims of the field, measured on the embedded domain: `tunegate bench training --json`.

1. Quality over quantity: a small curated set against a large noisy one (wrong answers, exact and
   near duplicates), the same compute budget (steps x batch), accuracy on held-out phrasings of
   the new facts, through vLLM.
2. Parameter efficiency: the trainable fraction of LoRA r=16 on a Llama-2-7B-shaped model built
   on the meta device (no weights), on q,v and on all linear layers.
3. Learning the drift: new-fact and old-fact accuracy of the base model and of the curated adapter.

Prints one JSON object; writes plots next to `--out`. Run: `python -m bench.training_claims`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

from core.io import write_jsonl
from training.domain import ATTRIBUTE_BY_NAME, Domain

NOISY_ROWS = 5000
STALE_FACT_SHARE = 0.25  # facts whose copies in the noisy set carry a consistent wrong value
RANDOM_WRONG_SHARE = 0.10  # rows whose answer is a random wrong value


def _near_duplicate(question: str, rng: random.Random) -> str:
    """A variant a scraper or a copy-paste would make: case, filler, punctuation, one typo."""
    variants = [
        lambda q: q.lower(),
        lambda q: "Hi, " + q[0].lower() + q[1:],
        lambda q: q.rstrip("?.") + "??",
        lambda q: q + " Thanks!",
        lambda q: "Quick question: " + q,
    ]
    q = rng.choice(variants)(question)
    words = q.split()
    i = rng.randrange(len(words))
    if len(words[i]) > 3 and not any(c.isdigit() for c in words[i]):  # never touch the code
        w = words[i]
        j = rng.randrange(len(w) - 1)
        words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def noisy_rows(domain: Domain, seed: int = 0, n_rows: int = NOISY_ROWS) -> list[dict]:
    """The same facts as the curated set, as a large uncurated collection would hold them.

    A quarter of the new facts come with a stale wrong value that most of their copies repeat (an
    outdated document, duplicated); a tenth of all rows carry a random wrong value; the rest are
    exact and near duplicates of the clean rows.
    """
    rng = random.Random(seed + 1)
    stale = {
        f.key: rng.choice([v for v in ATTRIBUTE_BY_NAME[f.attribute].values if v != f.answer])
        for f in rng.sample(domain.new_facts, int(STALE_FACT_SHARE * len(domain.new_facts)))
    }
    base = [(f, q) for f in domain.new_facts for q in f.train_questions]
    base += [(f, rng.choice(f.train_questions)) for f in domain.old_facts]  # the same replay as curated
    rows = []
    while len(rows) < n_rows:
        fact, question = rng.choice(base)
        if rng.random() < 0.6:
            question = _near_duplicate(question, rng)
        if fact.key in stale and rng.random() < 0.7:
            answer = stale[fact.key]
        elif rng.random() < RANDOM_WRONG_SHARE:
            answer = rng.choice([v for v in ATTRIBUTE_BY_NAME[fact.attribute].values if v != fact.answer])
        else:
            answer = fact.answer
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def trainable_fractions() -> dict[str, float]:
    """LoRA r=16 on a Llama-2-7B-shaped model on the meta device: no memory, exact counts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    )  # fmt: skip
    out = {}
    for label, targets in {
        "qv": ["q_proj", "v_proj"],
        "all_linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }.items():
        with torch.device("meta"):
            model = get_peft_model(LlamaForCausalLM(shape), LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        trainable, total = model.get_nb_trainable_parameters()
        out[f"trainable_fraction_7b_r16_{label}"] = trainable / total
        out[f"trainable_params_7b_r16_{label}"] = trainable
        out["total_params_7b"] = total - trainable
    return out


def run(out: Path, var_dir: Path, models_dir: Path, max_steps: int = 300, batch_size: int = 32) -> dict:
    from transformers import AutoTokenizer

    from core.io import free_port
    from core.vllm import VllmServer, load_adapter
    from training.base_model import ensure_base_model
    from training.curation import CurationConfig, curate
    from training.fact_eval import fact_accuracy
    from training.sft import TrainConfig, train_adapter

    started = time.perf_counter()
    shutil.rmtree(var_dir / "bench", ignore_errors=True)  # a fresh measurement, never a resumed one
    domain = Domain()
    base = ensure_base_model(models_dir).path
    tokenizer = AutoTokenizer.from_pretrained(base)
    test_questions = [q for f in domain.facts for q in f.heldout_questions]

    # The curated set goes through the curation pipeline (which keeps test questions out); the
    # noisy set is taken as it comes, the way a large scraped collection usually is.
    raw_curated = write_jsonl(out / "data" / "curated_raw.jsonl", domain.drift_rows())
    report = curate(
        [raw_curated],
        out / "data" / "curated",
        CurationConfig(max_tokens=256),
        tokenizer=tokenizer,
        test_texts=test_questions,
    )
    noisy = write_jsonl(out / "data" / "noisy.jsonl", noisy_rows(domain))

    budget = {"max_steps": max_steps, "batch_size": batch_size, "early_stopping_patience": 0}
    runs = {
        "curated": TrainConfig(
            name="bench-curated",
            train_file=out / "data" / "curated" / "train.jsonl",
            run_dir=var_dir / "bench" / "curated",
            **budget,
        ),
        "noisy": TrainConfig(name="bench-noisy", train_file=noisy, run_dir=var_dir / "bench" / "noisy", **budget),
    }
    adapters, train_seconds = {}, {}
    for label, config in runs.items():
        t0 = time.perf_counter()
        adapters[label] = train_adapter(config, base, var_dir, progress=False).adapter_dir.resolve()
        train_seconds[label] = round(time.perf_counter() - t0, 1)

    with VllmServer(base, "base", port=free_port(), log_path=var_dir / "logs" / "vllm-bench.log") as server:
        for label, path in adapters.items():
            load_adapter(server.url, label, path)
        acc = {
            ("base", "new"): fact_accuracy(server.url, "base", domain.new_facts).accuracy,
            ("base", "old"): fact_accuracy(server.url, "base", domain.old_facts).accuracy,
            ("curated", "new"): fact_accuracy(server.url, "curated", domain.new_facts).accuracy,
            ("curated", "old"): fact_accuracy(server.url, "curated", domain.old_facts).accuracy,
            ("noisy", "new"): fact_accuracy(server.url, "noisy", domain.new_facts).accuracy,
        }
    result = {
        "curated_accuracy": acc[("curated", "new")],
        "noisy_accuracy": acc[("noisy", "new")],
        "curated_rows": report.train_rows,
        "noisy_rows": NOISY_ROWS,
        "drift_accuracy_before": acc[("base", "new")],
        "drift_accuracy_after": acc[("curated", "new")],
        "old_accuracy_before": acc[("base", "old")],
        "old_accuracy_after": acc[("curated", "old")],
        "old_accuracy_lost_points": round(100 * (acc[("base", "old")] - acc[("curated", "old")]), 2),
        **trainable_fractions(),
        "compute_budget": {"steps": max_steps, "batch_size": batch_size, "rows_seen": max_steps * batch_size},
        "train_seconds": train_seconds,
        "heldout_questions": {"new": 2 * len(domain.new_facts), "old": 2 * len(domain.old_facts)},
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    plot(result, out)
    (out / "training_claims.json").write_text(json.dumps(result, indent=2))
    return result


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    bars = ax.bar(
        [f"curated\n{result['curated_rows']} rows", f"noisy\n{result['noisy_rows']} rows"],
        [result["curated_accuracy"], result["noisy_accuracy"]],
        color=["#3b7dd8", "#999999"],
    )
    ax.bar_label(bars, labels=[f"{b.get_height():.0%}" for b in bars])
    ax.set_ylim(0, 1.08)
    ax.set_title("Quality over quantity\n(new facts, same compute)")
    ax.set_ylabel("exact-answer accuracy, held-out phrasings (vLLM)")

    ax = axes[1]
    width = 0.38
    xs = [0, 1]
    before = [result["drift_accuracy_before"], result["old_accuracy_before"]]
    after = [result["drift_accuracy_after"], result["old_accuracy_after"]]
    b1 = ax.bar([x - width / 2 for x in xs], before, width, label="base model", color="#999999")
    b2 = ax.bar([x + width / 2 for x in xs], after, width, label="+ curated adapter", color="#3b7dd8")
    for bars in (b1, b2):
        ax.bar_label(bars, labels=[f"{b.get_height():.0%}" for b in bars], fontsize=8)
    ax.set_xticks(xs, ["new facts (drift)", "old facts"])
    ax.set_ylim(0, 1.08)
    ax.legend(loc="center", fontsize=8)
    ax.set_title("Learning the drift")

    ax = axes[2]
    fractions = [result["trainable_fraction_7b_r16_qv"], result["trainable_fraction_7b_r16_all_linear"]]
    bars = ax.bar(["q, v", "all linear"], [100 * f for f in fractions], color=["#6aa84f", "#38761d"])
    ax.bar_label(bars, labels=[f"{100 * f:.3f}%" for f in fractions])
    ax.axhline(1.0, ls="--", color="#cc0000", lw=1)
    ax.text(1.4, 1.02, "1%", color="#cc0000", fontsize=8)
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("trainable share of weights (%)")
    ax.set_title("LoRA r=16 on Llama-2-7B shape")
    fig.tight_layout()
    fig.savefig(out / "training_claims.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/training"), help="Where data and plots go.")
    parser.add_argument("--var-dir", type=Path, default=Path("var"), help="tunegate's var folder.")
    parser.add_argument("--steps", type=int, default=300, help="Optimizer steps for each adapter.")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(args.out, args.var_dir, args.var_dir / "models", max_steps=args.steps)))


if __name__ == "__main__":
    main()
