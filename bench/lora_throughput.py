"""Multi-adapter serving throughput through vLLM: `tunegate bench lora --json`.

One vLLM server (`--enable-lora`, `--max-loras 8`) serves the base model and 8 distinct LoRA
adapters (r=16 on all seven linear kinds, random non-zero weights: `init_lora_weights=False`, so
the adapters really compute; no training needed to measure speed). Four settings (base, 1, 4 and
8 adapters) run the same workload, interleaved in rounds (base, 1, 4, 8; base, 1, 4, 8; ...; and
base once more at the end). Each setting sends `requests` chat requests in all (domain questions,
greedy, `max_tokens` tokens each with `ignore_eos`, so every request generates exactly that many),
`concurrency` in flight at once; with k adapters the requests cycle over k adapter names, so
every batch mixes k distinct adapters. Every run is preceded by a few untimed warm-up requests.

Throughput = completion tokens (from `usage`) / wall seconds. `ratio_k` = throughput with k
adapters / base throughput, where base is the mean of the base runs (first, per round, last): the
machine this runs on is shared, and interleaving lands its drift on every setting alike. The
prefix cache is off, since every setting sends the same questions.
The target in the note is `ratio_4 >= 0.8`; this module measures, it does not assert.

Prints one JSON object; writes `lora_throughput.json` and `lora_throughput.png` to `--out`.
Run: `python -m bench.lora_throughput` or `tunegate bench lora --json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import time
from pathlib import Path

TARGET_RATIO = 0.8
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_COUNTS = (1, 4, 8)


def make_adapters(base_path: Path, out_dir: Path, n: int, rank: int = 16, seed: int = 0) -> list[Path]:
    """`n` distinct LoRA adapters for `base_path`, saved to `out_dir/a0 .. a{n-1}`; no training.

    `init_lora_weights=False` leaves both A and B at nn.Linear's random initialisation (the
    default would zero B, making an adapter a no-op that a server could skip); the seed differs
    per adapter, so the adapters differ from each other.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    paths = []
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        torch.manual_seed(seed + i)
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=TARGET_MODULES,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, config)
        path = out_dir / f"a{i}"
        shutil.rmtree(path, ignore_errors=True)
        peft_model.save_pretrained(path)
        paths.append(path.resolve())
    return paths


def _prompts(n: int) -> list[list[dict]]:
    from training.domain import Domain

    domain = Domain()
    questions = [q for f in domain.facts for q in f.heldout_questions]
    return [[{"role": "user", "content": questions[i % len(questions)]}] for i in range(n)]


async def _run_setting(
    url: str, models: list[str], conversations: list[list[dict]], max_tokens: int, concurrency: int
) -> dict:
    """Send every conversation once, request j to `models[j % len(models)]`; time the whole lot."""
    import httpx

    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens: list[int] = []
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(j: int, messages: list[dict]) -> None:
            body = {
                "model": models[j % len(models)],
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
            }
            async with limit:
                t0 = time.perf_counter()
                resp = await client.post("/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                raise RuntimeError(f"vLLM answered {resp.status_code}: {resp.text[:300]}")
            tokens.append(int(resp.json()["usage"]["completion_tokens"]))

        started = time.perf_counter()
        await asyncio.gather(*(one(j, m) for j, m in enumerate(conversations)))
        seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "adapters": [m for m in models if m != "base"],
        "requests": len(conversations),
        "completion_tokens": sum(tokens),
        "all_full_length": all(t == max_tokens for t in tokens),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(sum(tokens) / seconds, 1),
        "requests_per_s": round(len(conversations) / seconds, 2),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
    }


def _first_answers(url: str, models: list[str], messages: list[dict], max_tokens: int) -> dict[str, str]:
    """One greedy answer per model to the same question: do the adapters change what is computed?"""
    from core.vllm import chat_greedy

    return {m: chat_greedy(url, m, [messages], max_tokens=max_tokens, concurrency=1)[0] for m in models}


def _combine(runs: list[dict]) -> dict:
    """One setting's runs (one per round) as one: totals, and throughput = tokens / seconds."""
    tokens = sum(r["completion_tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    requests = sum(r["requests"] for r in runs)
    return {
        "adapters": runs[0]["adapters"],
        "requests": requests,
        "completion_tokens": tokens,
        "all_full_length": all(r["all_full_length"] for r in runs),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "requests_per_s": round(requests / seconds, 2),
        "tokens_per_s_by_run": [r["tokens_per_s"] for r in runs],
        "latency_p50_s_by_run": [r["latency_p50_s"] for r in runs],
        "latency_p95_s_by_run": [r["latency_p95_s"] for r in runs],
    }


def run(
    out: Path,
    var_dir: Path,
    models_dir: Path,
    vllm_settings=None,
    requests: int = 256,
    concurrency: int = 64,
    max_tokens: int = 32,
    warmup: int = 16,
    rounds: int = 2,
) -> dict:
    """Measure; `requests` per setting are split over `rounds` interleaved rounds (base, 1, 4, 8)."""
    from core.io import free_port
    from core.settings import VllmSettings
    from core.vllm import VllmServer, load_adapter
    from training.base_model import ensure_base_model

    started = time.perf_counter()
    n_adapters = max(ADAPTER_COUNTS)
    base_settings = vllm_settings or VllmSettings()
    extra = list(base_settings.extra_args)
    if not any("prefix-caching" in a for a in extra):
        # Every setting sends the same questions: a prefix cache would favour the later runs.
        extra.append("--no-enable-prefix-caching")
    settings = base_settings.model_copy(
        update={
            "max_loras": max(base_settings.max_loras, n_adapters),
            "max_lora_rank": max(base_settings.max_lora_rank, 16),
            "extra_args": extra,
        }
    )
    base = ensure_base_model(models_dir, progress=False).path
    t0 = time.perf_counter()
    adapter_paths = make_adapters(base, var_dir / "bench" / "lora" / "adapters", n_adapters)
    make_seconds = time.perf_counter() - t0
    names = [p.name for p in adapter_paths]
    conversations = _prompts(requests)
    rounds = max(1, min(rounds, requests))
    chunks = [conversations[r::rounds] for r in range(rounds)]
    # Settings interleave round by round, and base runs once more at the very end, so that the
    # drift of a shared machine lands on every setting alike and shows in `base_drift`.
    settings_models = {"base": ["base"], **{f"adapters_{k}": names[:k] for k in ADAPTER_COUNTS}}
    plan = [(label, chunk) for chunk in chunks for label in settings_models]
    plan.append(("base", chunks[0]))

    log = var_dir / "logs" / "vllm-bench-lora.log"
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {label: [] for label in settings_models}
    with VllmServer(base, "base", settings, port=free_port(), log_path=log) as server:
        startup_seconds = time.perf_counter() - t0
        for name, path in zip(names, adapter_paths, strict=True):
            load_adapter(server.url, name, path)
        answers = _first_answers(server.url, ["base", *names], conversations[0], max_tokens)
        for label, chunk in plan:
            models = settings_models[label]
            # Warm-up: every adapter of the setting at least twice, outside the timed window.
            n_warm = max(warmup, 2 * len(models))
            asyncio.run(_run_setting(server.url, models, conversations[:n_warm], max_tokens, concurrency))
            runs[label].append(asyncio.run(_run_setting(server.url, models, chunk, max_tokens, concurrency)))

    base_runs = runs["base"]
    base_tps = statistics.mean(r["tokens_per_s"] for r in base_runs)
    measured = {label: _combine(rs) for label, rs in runs.items()}
    measured["base"]["tokens_per_s"] = round(base_tps, 1)  # the mean of the base runs, as reported
    ratios = {k: measured[f"adapters_{k}"]["tokens_per_s"] / base_tps for k in ADAPTER_COUNTS}
    result: dict = {
        "base_tokens_per_s": round(base_tps, 1),
        **{f"ratio_{k}": round(r, 3) for k, r in ratios.items()},
        "target_ratio_4": TARGET_RATIO,
        "meets_target": ratios[4] >= TARGET_RATIO,
        "base_drift": round(base_runs[-1]["tokens_per_s"] / base_runs[0]["tokens_per_s"], 3),
        "settings": measured,
        "distinct_answers_to_one_prompt": len(set(answers.values())),
        "models_asked": len(answers),
        "workload": {
            "requests_per_setting": requests,
            "rounds": rounds,
            "concurrency": concurrency,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "warmup_requests": warmup,
            "endpoint": "/v1/chat/completions",
            "order": [label for label, _ in plan],
        },
        "adapter": {"rank": 16, "alpha": 32, "target_modules": TARGET_MODULES, "count": n_adapters},
        "server": {
            "max_loras": settings.max_loras,
            "max_lora_rank": settings.max_lora_rank,
            "max_model_len": settings.max_model_len,
            "extra_args": settings.extra_args,
            "base_served_with_enable_lora": True,
        },
        "make_adapters_seconds": round(make_seconds, 1),
        "vllm_startup_seconds": round(startup_seconds, 1),
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out)
    (out / "lora_throughput.json").write_text(json.dumps(result, indent=2))
    return result


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    base_tps = result["base_tokens_per_s"]
    labels = ["base"] + [f"{k} adapter{'s' if k > 1 else ''}" for k in ADAPTER_COUNTS]
    values = [base_tps] + [s[f"adapters_{k}"]["tokens_per_s"] for k in ADAPTER_COUNTS]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bars = ax.bar(labels, values, color=["#999999", "#3b7dd8", "#2b5fa8", "#1b3f78"])
    for bar, v in zip(bars, values, strict=True):  # near the foot of each bar, clear of the run dots
        ax.text(bar.get_x() + bar.get_width() / 2, 0.03 * max(values), f"{v:.0f}\n({v / base_tps:.0%})",
                ha="center", va="bottom", color="white", fontsize=9)  # fmt: skip
    for i, label in enumerate(["base"] + [f"adapters_{k}" for k in ADAPTER_COUNTS]):
        each = s[label]["tokens_per_s_by_run"]
        dots = "single runs" if i == 0 else None
        ax.scatter([i] * len(each), each, color="black", s=10, zorder=3, label=dots)
    target = f"target: {TARGET_RATIO:.0%} of base"
    ax.axhline(TARGET_RATIO * base_tps, ls="--", color="#cc0000", lw=1, label=target)
    ax.set_ylim(0, 1.25 * max(values))
    ax.set_ylabel("generated tokens / s")
    w = result["workload"]
    ax.set_title(
        "Multi-LoRA serving, vLLM, one server\n"
        f"{w['requests_per_setting']} requests x {w['max_tokens']} tokens per setting, "
        f"{w['concurrency']} in flight, {w['rounds']} interleaved rounds",
        fontsize=10,
    )
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lora_throughput.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/lora"), help="Where JSON and plot go.")
    parser.add_argument("--var-dir", type=Path, default=Path("var"), help="tunegate's var folder.")
    parser.add_argument("--requests", type=int, default=256, help="Requests per setting.")
    parser.add_argument("--concurrency", type=int, default=64, help="Requests in flight at once.")
    parser.add_argument("--max-tokens", type=int, default=32, help="Tokens generated per request.")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved rounds the requests split into.")
    args = parser.parse_args(argv)
    result = run(
        args.out,
        args.var_dir,
        args.var_dir / "models",
        requests=args.requests,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        rounds=args.rounds,
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
