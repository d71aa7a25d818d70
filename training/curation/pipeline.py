"""The curation pipeline: `curate()` runs the steps in order and writes the dataset and its report.

Owns `curate()` (read → validate → scrub PII → chat template → length → exact and near duplicates →
contamination against eval test sets → deterministic train/validation split), `StepCount`,
`CurationReport` (what `report.json` holds) and `dataset_hash()`. Imports the other modules of
`training.curation`, `guardrails.pii` and `core.io`.

PII is scrubbed right after validation (before the template, length and duplicate checks) so that
lengths are measured on the text that is written and rows that differ only in personal data count
as duplicates. The contamination check looks at each user turn both before and after scrubbing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.io import atomic_write_bytes, sha256_file, write_jsonl
from guardrails.pii import PII_KINDS
from training.curation import rules
from training.curation.config import CurationConfig
from training.curation.readers import InputFile
from training.curation.report import render_html
from training.curation.rules import RULES, Example, Reject, Rejection

REPORT_FILES: frozenset[str] = frozenset({"report.json", "report.html"})


@dataclass
class StepCount:
    """Rows going into and out of one pipeline step."""

    name: str
    rows_in: int
    rows_out: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in": self.rows_in,
            "out": self.rows_out,
            "removed": self.rows_in - self.rows_out,
            "note": self.note,
        }


@dataclass
class CurationReport:
    """What `curate()` did; `to_dict()` is what `report.json` holds."""

    config: CurationConfig
    out_dir: Path
    inputs: list[dict[str, Any]]
    steps: list[StepCount]
    rejections: list[Rejection]
    pii_counts: dict[str, int]
    examples_with_pii: int
    outputs: dict[str, dict[str, Any]]
    length_unit: str

    @property
    def rejected_by_rule(self) -> dict[str, int]:
        counts = Counter(r.rule for r in self.rejections)
        return {rule: counts.get(rule, 0) for rule in RULES}

    @property
    def train_rows(self) -> int:
        return self.outputs["train.jsonl"]["rows"]

    @property
    def validation_rows(self) -> int:
        return self.outputs["validation.jsonl"]["rows"]

    @property
    def dataset_hash(self) -> str:
        """Hash of the written dataset, equal to `dataset_hash(out_dir)`."""
        return dataset_hash(self.out_dir)

    def samples(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {rule: [] for rule in RULES}
        for r in self.rejections:
            if len(out[r.rule]) < self.config.max_samples_per_rule:
                out[r.rule].append(r.to_dict())
        return out

    def to_dict(self) -> dict[str, Any]:
        rows_in = self.steps[0].rows_in if self.steps else 0
        return {
            "format_version": 1,
            "summary": {
                "rows_in": rows_in,
                "rejected": len(self.rejections),
                "kept": self.train_rows + self.validation_rows,
                "train": self.train_rows,
                "validation": self.validation_rows,
                "examples_with_pii": self.examples_with_pii,
            },
            "config": self.config.to_dict(),
            "length_unit": self.length_unit,
            "inputs": self.inputs,
            "steps": [s.to_dict() for s in self.steps],
            "rejected_by_rule": self.rejected_by_rule,
            "pii_masked": self.pii_counts,
            "outputs": self.outputs,
            "dataset_hash": self.dataset_hash,
            "sample_rejections": self.samples(),
        }

    def write(self) -> None:
        """Write `report.html` and `report.json` into `out_dir`, each atomically."""
        data = self.to_dict()
        atomic_write_bytes(self.out_dir / "report.html", render_html(data).encode("utf-8"))
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"  # in pipeline order, not key-sorted
        atomic_write_bytes(self.out_dir / "report.json", text.encode("utf-8"))


def dataset_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a dataset: a file's bytes, or every file under a directory.

    For a directory the hash covers each regular file's relative path and bytes, in sorted order,
    skipping hidden files (such as temp files) and the curation report (`report.json`,
    `report.html`), so a curated `out_dir` hashes to the same value however it was produced.
    """
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if not p.is_dir():
        raise FileNotFoundError(f"`path` {str(p)!r} is neither a file nor a directory; pass a dataset file or folder.")
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        rel = f.relative_to(p)
        if any(part.startswith(".") for part in rel.parts) or (len(rel.parts) == 1 and rel.name in REPORT_FILES):
            continue
        h.update(rel.as_posix().encode("utf-8") + b"\x00")
        h.update(sha256_file(f).encode("ascii") + b"\n")
    return h.hexdigest()


class _Run:
    """The examples still in the running, with the rejections and step counts so far."""

    def __init__(self) -> None:
        self.examples: list[Example] = []
        self.rejections: list[Rejection] = []
        self.steps: list[StepCount] = []

    def step(self, name: str, check: Callable[[Example], None], note: str = "") -> None:
        """Keep the examples `check` does not reject."""
        kept = []
        for ex in self.examples:
            try:
                check(ex)
            except Reject as rej:
                self.rejections.append(rej.at(ex.source, ex.line))
                continue
            kept.append(ex)
        self.steps.append(StepCount(name, len(self.examples), len(kept), note))
        self.examples = kept

    def skip(self, name: str, note: str) -> None:
        """A step that keeps every example."""
        self.steps.append(StepCount(name, len(self.examples), len(self.examples), note))


def _input_paths(input_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(input_paths, (str, os.PathLike)):
        input_paths = [input_paths]
    paths = [Path(p) for p in input_paths]
    if not paths:
        raise ValueError("`input_paths` is empty; pass at least one JSONL or JSON file.")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input file {str(p)!r} does not exist; check `input_paths`.")
    return paths


def curate(
    input_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    config: CurationConfig | None = None,
    tokenizer: Any = None,
    test_texts: Iterable[str] = (),
) -> CurationReport:
    """Curate `input_paths` into `out_dir/{train,validation}.jsonl` plus `report.json` and `report.html`.

    `tokenizer` (a `transformers` tokenizer with a `chat_template`) enables the template check and
    measures length in tokens; without it the template check is skipped and length is counted in
    whitespace-separated words. `test_texts` are the eval questions no training user turn may overlap.
    """
    config = config or CurationConfig()
    paths = _input_paths(input_paths)
    rules.check_tokenizer(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run()

    # 1. Parse and validate, file by file.
    files = [InputFile(path, config.input_format) for path in paths]
    inputs = []
    for file in files:
        for item in file:
            (run.rejections if isinstance(item, Rejection) else run.examples).append(item)
        inputs.append(file.summary())
    run.steps.append(StepCount("parse", sum(f.rows for f in files), sum(f.parsed for f in files)))
    run.steps.append(StepCount("validate", sum(f.parsed for f in files), len(run.examples)))

    # 2. PII.
    if config.scrub_pii:
        for ex in run.examples:
            rules.scrub_example(ex, config.pii_kinds)
    run.skip("pii_scrub", "" if config.scrub_pii else "disabled (`scrub_pii=False`)")

    # 3. Template and length.
    if tokenizer is not None:
        length_unit = "tokens"

        def template(ex: Example) -> None:
            ex.length = rules.token_length(ex.messages, tokenizer)

        run.step("template", template)
    else:
        length_unit = "words (no tokenizer given)"
        for ex in run.examples:
            ex.length = rules.word_length(ex.messages)
        run.skip("template", "skipped: no tokenizer given")
    unit = length_unit.split()[0]
    run.step("length", lambda ex: rules.check_length(ex, config.max_tokens, unit))

    # 4. Exact and near duplicates (the first occurrence is kept).
    run.step("exact_dedup", rules.ExactDuplicates().check)
    if config.near_dedup:
        near = rules.NearDuplicates(config.near_dup_threshold, config.num_perm, config.shingle_size)
        run.step("near_dedup", near.check, near.note)
    else:
        run.skip("near_dedup", "disabled (`near_dedup=False`)")

    # 5. Contamination.
    index = rules.Contamination(test_texts, config.contamination_ngram, config.contamination_overlap)
    run.step("contamination", index.check, "" if index else "no test texts given")

    # 6. Split and write.
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    for ex in run.examples:
        splits[rules.split_of(ex.key, config.seed, config.validation_fraction)].append({"messages": ex.messages})
    run.skip("split", f"{len(splits['train'])} train, {len(splits['validation'])} validation")
    outputs: dict[str, dict[str, Any]] = {}
    for split, rows in splits.items():
        path = write_jsonl(out / f"{split}.jsonl", rows, atomic=True)
        outputs[path.name] = {"rows": len(rows), "sha256": sha256_file(path)}

    pii_total = Counter[str]()
    for ex in run.examples:
        pii_total.update(ex.pii)
    report = CurationReport(
        config=config,
        out_dir=out,
        inputs=inputs,
        steps=run.steps,
        rejections=run.rejections,
        pii_counts={k: pii_total[k] for k in PII_KINDS if pii_total[k]},
        examples_with_pii=sum(bool(ex.pii) for ex in run.examples),
        outputs=outputs,
        length_unit=length_unit,
    )
    report.write()
    return report
