"""Data curation: turn raw example files into a clean, deduplicated, PII-scrubbed chat dataset.

Owns `CurationConfig`, `curate()` (read → validate → scrub PII → chat template → length → exact and
near duplicates → contamination against eval test sets → deterministic train/validation split), the
report it writes (`report.json`, `report.html`) and `dataset_hash()`. May import `tunegate` and
`guardrails`, never `gateway`; it uses `guardrails.pii` for scrubbing.

Input files are read in the order given; each is auto-detected as OpenAI chat JSONL
(`{"messages": [...]}`), prompt/completion JSONL (`{"prompt": ..., "completion": ...}`) or an
Alpaca JSON array (`[{"instruction", "input", "output"}, ...]`) and normalised to chat `messages`.
A bad row is rejected with a rule name, a message and its line number, never a crash.

PII is scrubbed right after validation (before the template, length and duplicate checks) so that
lengths are measured on the text that is written and rows that differ only in personal data count
as duplicates. The contamination check looks at each user turn both before and after scrubbing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import os
import re
import unicodedata
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasketch import MinHash, MinHashLSH

from guardrails.pii import PII_KINDS, scrub

#: Rejection rules, in pipeline order.
RULES: tuple[str, ...] = (
    "json",
    "schema",
    "roles",
    "template",
    "length",
    "exact_duplicate",
    "near_duplicate",
    "contamination",
)
FORMATS: tuple[str, ...] = ("chat", "prompt_completion", "alpaca")
ROLES: tuple[str, ...] = ("system", "user", "assistant")
REPORT_FILES: frozenset[str] = frozenset({"report.json", "report.html"})
_WORD_RE = re.compile(r"\w+")


@dataclass
class CurationConfig:
    """How `curate()` filters and splits a dataset."""

    max_tokens: int = field(
        default=2048,
        metadata={"help": "Longest example kept, in tokens of the rendered chat template (the base model context)."},
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of examples sent to `validation.jsonl`, in [0, 1)."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the split hash; the same seed and example always land in the same split."},
    )
    near_dup_threshold: float = field(
        default=0.8,
        metadata={"help": "Estimated Jaccard similarity of word shingles at or above which a row is a near-dup."},
    )
    near_dedup: bool = field(
        default=True,
        metadata={"help": "Remove near-duplicates with MinHash LSH (exact duplicates are always removed)."},
    )
    shingle_size: int = field(default=3, metadata={"help": "Words per shingle for near-duplicate detection."})
    num_perm: int = field(
        default=128, metadata={"help": "MinHash permutations; more is more accurate and slower (16-1024)."}
    )
    contamination_ngram: int = field(
        default=8,
        metadata={"help": "Words per n-gram of the contamination check (shorter test texts: their length)."},
    )
    contamination_overlap: float = field(
        default=0.0,
        metadata={
            "help": "Reject a user turn holding more than this share of a test text's n-grams "
            "(0: any shared n-gram) and all of its words that carry digits."
        },
    )
    scrub_pii: bool = field(default=True, metadata={"help": "Mask PII with typed placeholders such as `[EMAIL]`."})
    pii_kinds: tuple[str, ...] = field(
        default=PII_KINDS, metadata={"help": f"PII kinds to mask, a subset of {', '.join(PII_KINDS)}."}
    )
    input_format: str = field(
        default="auto",
        metadata={"help": "Input format: `auto` (detected per file), `chat`, `prompt_completion` or `alpaca`."},
    )
    max_samples_per_rule: int = field(default=5, metadata={"help": "Sample rejections kept per rule in the report."})

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(
                f"`max_tokens` must be a positive integer, got {self.max_tokens!r}; "
                "set it to the base model's context length, e.g. 2048."
            )
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"`validation_fraction` must be in [0, 1), got {self.validation_fraction!r}; "
                "use e.g. 0.1 for a 10% validation split or 0 for none."
            )
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise ValueError(
                f"`near_dup_threshold` must be in (0, 1], got {self.near_dup_threshold!r}; "
                "0.8 is a good default, or set `near_dedup=False` to turn near-duplicate removal off."
            )
        if not isinstance(self.shingle_size, int) or self.shingle_size < 1:
            raise ValueError(f"`shingle_size` must be an integer >= 1, got {self.shingle_size!r}; 3 is typical.")
        if not isinstance(self.num_perm, int) or not 16 <= self.num_perm <= 1024:
            raise ValueError(f"`num_perm` must be an integer in [16, 1024], got {self.num_perm!r}; 128 is typical.")
        if not isinstance(self.contamination_ngram, int) or self.contamination_ngram < 1:
            raise ValueError(
                f"`contamination_ngram` must be an integer >= 1, got {self.contamination_ngram!r}; "
                "8 words is the usual setting (13 is stricter about what counts as overlap)."
            )
        if not 0 <= self.contamination_overlap < 1:
            raise ValueError(
                f"`contamination_overlap` must be in [0, 1), got {self.contamination_overlap!r}; 0 (the "
                "default) rejects any shared n-gram, 0.5 more than half of a test text's n-grams."
            )
        self.pii_kinds = tuple(self.pii_kinds)
        unknown = sorted(set(self.pii_kinds) - set(PII_KINDS))
        if unknown:
            raise ValueError(f"`pii_kinds` got unknown kinds {unknown}; choose from {list(PII_KINDS)}.")
        if self.input_format not in ("auto", *FORMATS):
            raise ValueError(
                f"`input_format` must be one of {['auto', *FORMATS]}, got {self.input_format!r}; "
                "use `auto` to detect the format of each file."
            )
        if not isinstance(self.max_samples_per_rule, int) or self.max_samples_per_rule < 0:
            raise ValueError(f"`max_samples_per_rule` must be an integer >= 0, got {self.max_samples_per_rule!r}.")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pii_kinds"] = list(self.pii_kinds)
        return d


@dataclass(frozen=True)
class Rejection:
    """One rejected row: which rule, why, and where (input file and 1-based line)."""

    rule: str
    message: str
    source: str
    line: int

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "message": self.message, "source": self.source, "line": self.line}


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


# --------------------------------------------------------------------------------------------------
# Reading and normalising


class _Reject(Exception):
    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message


@dataclass
class _Example:
    messages: list[dict[str, str]]
    source: str
    line: int
    raw_user_turns: list[str] = field(default_factory=list)
    pii: Counter[str] = field(default_factory=Counter)
    key: str = ""


def _detect(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def _iter_jsonl(path: Path, source: str) -> Iterator[tuple[int, Any] | Rejection]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Rejection("json", f"line is not valid UTF-8 ({exc.reason} at byte {exc.start})", source, lineno)
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as exc:
                yield Rejection("json", f"invalid JSON: {exc.msg} at column {exc.colno}", source, lineno)
            except (ValueError, RecursionError) as exc:
                yield Rejection("json", f"invalid JSON: {exc}", source, lineno)


def _iter_json_array(data: bytes, source: str) -> Iterator[tuple[int, Any] | Rejection]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        yield Rejection(
            "json", f"file is not valid UTF-8 ({exc.reason}); the rest of the file was skipped", source, line
        )
        return
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    idx = ws.match(text, 0).end() + 1  # past "["
    line, counted_to = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        return line

    idx = ws.match(text, idx).end()
    if text[idx : idx + 1] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, idx)
        except (ValueError, RecursionError) as exc:
            where = exc.lineno if isinstance(exc, json.JSONDecodeError) else line_at(idx)
            yield Rejection("json", f"invalid JSON: {exc}; the rest of the file was skipped", source, where)
            return
        yield line_at(idx), obj
        idx = ws.match(text, end).end()
        if text[idx : idx + 1] == ",":
            idx = ws.match(text, idx + 1).end()
            continue
        if text[idx : idx + 1] == "]":
            if ws.match(text, idx + 1).end() != len(text):
                yield Rejection("json", "unexpected data after the JSON array", source, line_at(idx))
            return
        what = "the end of the file" if idx >= len(text) else repr(text[idx])
        yield Rejection(
            "json",
            f"expected `,` or `]` after an array item, found {what}; the rest of the file was skipped",
            source,
            line_at(idx),
        )
        return


def _iter_records(path: Path, source: str) -> Iterator[tuple[int, Any] | Rejection]:
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if head.startswith(b"["):
        data = path.read_bytes()
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        yield from _iter_json_array(data, source)
    else:
        yield from _iter_jsonl(path, source)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Reject("schema", f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _Reject("schema", f"{what} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Reject("schema", f"{what} is not valid Unicode ({exc.reason})") from None
    return value


def _chat_messages(raw: Any, what: str = "`messages`") -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise _Reject("schema", f"{what} must be a non-empty list of messages")
    messages = []
    for i, msg in enumerate(raw, start=1):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise _Reject("schema", f"message {i} must be an object with `role` and `content`")
        role = msg["role"]
        if not isinstance(role, str):
            raise _Reject("schema", f"message {i} has a non-string `role`")
        messages.append({"role": role, "content": _text(msg["content"], f"message {i} `content`")})
    return messages


def _normalise(fmt: str, record: Any) -> list[dict[str, str]]:
    if not isinstance(record, dict):
        raise _Reject("schema", f"expected a JSON object, got {type(record).__name__}")
    got = _detect(record)
    if got != fmt:
        keys = ", ".join(sorted(map(str, record))[:8])
        raise _Reject("schema", f"expected a record in `{fmt}` format like the rest of this file, got keys [{keys}]")
    if fmt == "chat":
        return _chat_messages(record["messages"])
    if fmt == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):  # TRL conversational form
            return _chat_messages(prompt, "`prompt`") + _chat_messages(completion, "`completion`")
        return [
            {"role": "user", "content": _text(prompt, "`prompt`")},
            {"role": "assistant", "content": _text(completion, "`completion`")},
        ]
    # alpaca
    instruction = _text(record["instruction"], "`instruction`")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise _Reject("schema", f"`input` must be a string, got {type(extra).__name__}")
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": _text(record["system"], "`system`")})
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": _text(record["output"], "`output`")})
    return messages


def _check_roles(messages: list[dict[str, str]]) -> None:
    for i, msg in enumerate(messages, start=1):
        if msg["role"] not in ROLES:
            raise _Reject("roles", f"message {i} has role {msg['role'][:40]!r}; allowed roles are {', '.join(ROLES)}")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    offset = len(messages) - len(turns)
    if not turns:
        raise _Reject("roles", "a system message alone is not an example; add a user and an assistant turn")
    for i, msg in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            raise _Reject(
                "roles",
                f"message {i + 1 + offset} is `{msg['role']}` but `{want}` was expected: after an optional "
                "system message, turns must alternate user, assistant",
            )
    if turns[-1]["role"] != "assistant":
        raise _Reject("roles", "the last message must be an `assistant` turn (the answer to learn)")


# --------------------------------------------------------------------------------------------------
# Text keys


def _norm_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(unicodedata.normalize("NFKC", text).casefold())


def _example_key(messages: list[dict[str, str]]) -> str:
    joined = "\x1e".join(f"{m['role']}\x1f{_norm_text(m['content'])}" for m in messages)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


def _minhash(messages: list[dict[str, str]], config: CurationConfig) -> MinHash:
    words = [w for m in messages for w in _words(m["content"])]
    k = config.shingle_size
    shingles = {" ".join(words[i : i + k]) for i in range(max(1, len(words) - k + 1))}
    mh = MinHash(num_perm=config.num_perm, seed=1)
    mh.update_batch([s.encode("utf-8") for s in sorted(shingles)])
    return mh


def _make_lsh(threshold: float, num_perm: int) -> tuple[MinHashLSH, float]:
    """An LSH index for `threshold`, or for the highest lower threshold datasketch accepts.

    datasketch needs at least two bands, which rules out thresholds near 1 for small `num_perm`
    (e.g. 0.99 at 128). A lower candidate threshold only finds more candidates; every candidate is
    verified against the real threshold, so the result is the same.
    """
    candidate = threshold
    while True:
        try:
            return MinHashLSH(threshold=candidate, num_perm=num_perm), candidate
        except ValueError:
            if candidate <= 0.5:
                raise
            candidate = round(max(0.5, candidate - 0.01), 2)


def _split_of(key: str, config: CurationConfig) -> str:
    digest = hashlib.sha256(f"{config.seed}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if u < config.validation_fraction else "train"


class _Contamination:
    """N-gram index over eval test texts.

    A text is contaminated by a test text when it equals it (after normalising), or when it holds
    more than `overlap` of the test text's word n-grams (n = min(`n`, the test text's length); the
    default 0 means any shared n-gram) *and* every word of the test text that carries a digit (a
    code, an amount, a date). Why the second condition: in a templated domain, "What is the unit
    rate of tariff T417?" shares its template with the test question about tariff T896, and a
    question about another tariff is not the test question.
    """

    def __init__(self, test_texts: Iterable[str], n: int, overlap: float) -> None:
        self.n, self.overlap = n, overlap
        self.exact: dict[str, int] = {}
        self.grams_of: dict[int, set[tuple[str, ...]]] = {}
        self.anchors_of: dict[int, set[str]] = {}
        self.index: dict[tuple[str, ...], list[int]] = {}
        for idx, text in enumerate(test_texts):
            words = _words(str(text))
            if not words:
                continue
            self.exact.setdefault(" ".join(words), idx)
            k = min(n, len(words))
            grams = {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}
            self.grams_of[idx] = grams
            self.anchors_of[idx] = {w for w in words if any(c.isdigit() for c in w)}
            for gram in grams:
                self.index.setdefault(gram, []).append(idx)
        self.sizes = sorted({len(g) for g in self.index})

    def __bool__(self) -> bool:
        return bool(self.exact)

    def find(self, text: str) -> str | None:
        words = _words(text)
        if not words:
            return None
        hit = self.exact.get(" ".join(words))
        if hit is not None:
            return f"equals test text {hit} (after normalising case and punctuation)"
        present = set(words)
        shared: dict[int, list[tuple[str, ...]]] = {}
        for k in self.sizes:
            for gram in {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}:
                for idx in self.index.get(gram, ()):
                    shared.setdefault(idx, []).append(gram)
        for idx, grams in sorted(shared.items()):
            if len(grams) / len(self.grams_of[idx]) > self.overlap and self.anchors_of[idx] <= present:
                shown = " ".join(min(grams))
                return f"shares the {len(grams[0])}-gram {shown[:120]!r} with test text {idx}"
        return None


# --------------------------------------------------------------------------------------------------
# Files


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a dataset: a file's bytes, or every file under a directory.

    For a directory the hash covers each regular file's relative path and bytes, in sorted order,
    skipping hidden files (such as temp files) and the curation report (`report.json`,
    `report.html`), so a curated `out_dir` hashes to the same value however it was produced.
    """
    p = Path(path)
    if p.is_file():
        return _sha256_file(p)
    if not p.is_dir():
        raise FileNotFoundError(f"`path` {str(p)!r} is neither a file nor a directory; pass a dataset file or folder.")
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        rel = f.relative_to(p)
        if any(part.startswith(".") for part in rel.parts) or (len(rel.parts) == 1 and rel.name in REPORT_FILES):
            continue
        h.update(rel.as_posix().encode("utf-8") + b"\x00")
        h.update(_sha256_file(f).encode("ascii") + b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# The pipeline


def _check_tokenizer(tokenizer: Any) -> None:
    if tokenizer is None:
        return
    if not hasattr(tokenizer, "apply_chat_template"):
        raise TypeError(
            f"`tokenizer` must be a transformers tokenizer with `apply_chat_template`, got {type(tokenizer).__name__}."
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "`tokenizer` has no `chat_template`; set `tokenizer.chat_template` to the template the model is "
            "served with, or pass `tokenizer=None` to skip the template check."
        )


def _render_and_count(messages: list[dict[str, str]], tokenizer: Any) -> int:
    """Apply the chat template (raising _Reject on failure) and return the length in tokens."""
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # a template can raise anything (jinja TemplateError, TypeError, ...)
        raise _Reject("template", f"chat template failed: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(rendered, str):
        raise _Reject("template", f"chat template returned {type(rendered).__name__}, not text")
    # The template already places any special tokens (BOS etc.), as TRL does when it tokenises.
    return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


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
    if isinstance(input_paths, (str, os.PathLike)):
        input_paths = [input_paths]
    paths = [Path(p) for p in input_paths]
    if not paths:
        raise ValueError("`input_paths` is empty; pass at least one JSONL or JSON file.")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input file {str(p)!r} does not exist; check `input_paths`.")
    _check_tokenizer(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    rejections: list[Rejection] = []
    steps: list[StepCount] = []
    inputs: list[dict[str, Any]] = []

    # 1. Parse and validate.
    rows_in = 0
    parsed = 0
    examples: list[_Example] = []
    for path in paths:
        source = str(path)
        fmt = None if config.input_format == "auto" else config.input_format
        file_rows = 0
        for item in _iter_records(path, source):
            file_rows += 1
            if isinstance(item, Rejection):
                rejections.append(item)
                continue
            parsed += 1
            line, record = item
            if fmt is None:
                fmt = _detect(record)
            try:
                if fmt is None:
                    raise _Reject(
                        "schema",
                        "unrecognised record: expected `messages`, `prompt`+`completion`, or `instruction`+`output`",
                    )
                messages = _normalise(fmt, record)
                _check_roles(messages)
            except _Reject as rej:
                rejections.append(Rejection(rej.rule, rej.message, source, line))
                continue
            examples.append(_Example(messages, source, line))
        rows_in += file_rows
        inputs.append({"path": source, "format": fmt or "unknown", "rows": file_rows, "sha256": _sha256_file(path)})
    steps.append(StepCount("parse", rows_in, parsed))
    steps.append(StepCount("validate", parsed, len(examples)))

    # 2. PII.
    for ex in examples:
        ex.raw_user_turns = [m["content"] for m in ex.messages if m["role"] == "user"]
        if config.scrub_pii:
            for m in ex.messages:
                m["content"], found = scrub(m["content"], config.pii_kinds)
                ex.pii.update(found)
    steps.append(
        StepCount(
            "pii_scrub",
            len(examples),
            len(examples),
            "" if config.scrub_pii else "disabled (`scrub_pii=False`)",
        )
    )

    def run_step(name: str, keep_fn: Callable[[_Example], None], note: str = "") -> None:
        nonlocal examples
        kept = []
        for ex in examples:
            try:
                keep_fn(ex)
            except _Reject as rej:
                rejections.append(Rejection(rej.rule, rej.message, ex.source, ex.line))
                continue
            kept.append(ex)
        steps.append(StepCount(name, len(examples), len(kept), note))
        examples = kept

    # 3. Template and length.
    lengths: dict[int, int] = {}
    if tokenizer is not None:
        length_unit = "tokens"

        def template(ex: _Example) -> None:
            lengths[id(ex)] = _render_and_count(ex.messages, tokenizer)

        run_step("template", template)
    else:
        length_unit = "words (no tokenizer given)"
        for ex in examples:
            lengths[id(ex)] = sum(len(m["content"].split()) for m in ex.messages)
        steps.append(StepCount("template", len(examples), len(examples), "skipped: no tokenizer given"))

    def length(ex: _Example) -> None:
        n = lengths[id(ex)]
        if n > config.max_tokens:
            raise _Reject("length", f"{n} {length_unit.split()[0]} is over `max_tokens` {config.max_tokens}")

    run_step("length", length)

    # 4. Exact and near duplicates (the first occurrence is kept).
    seen: dict[str, tuple[str, int]] = {}

    def exact(ex: _Example) -> None:
        ex.key = _example_key(ex.messages)
        first = seen.get(ex.key)
        if first is not None:
            raise _Reject("exact_duplicate", f"duplicate of {first[0]} line {first[1]} (after normalising text)")
        seen[ex.key] = (ex.source, ex.line)

    run_step("exact_dedup", exact)

    if config.near_dedup:
        lsh, lsh_threshold = _make_lsh(config.near_dup_threshold, config.num_perm)
        kept_hashes: dict[str, tuple[MinHash, str, int]] = {}

        def near(ex: _Example) -> None:
            mh = _minhash(ex.messages, config)
            for cand in sorted(lsh.query(mh)):
                other, src, line = kept_hashes[cand]
                sim = mh.jaccard(other)
                if sim >= config.near_dup_threshold:
                    raise _Reject(
                        "near_duplicate",
                        f"near-duplicate of {src} line {line} (estimated Jaccard {sim:.2f} >= "
                        f"`near_dup_threshold` {config.near_dup_threshold})",
                    )
            name = str(len(kept_hashes))
            lsh.insert(name, mh)
            kept_hashes[name] = (mh, ex.source, ex.line)

        note = ""
        if lsh_threshold != config.near_dup_threshold:
            note = f"LSH candidates at Jaccard {lsh_threshold:.2f}, verified at {config.near_dup_threshold}"
        run_step("near_dedup", near, note)
    else:
        steps.append(StepCount("near_dedup", len(examples), len(examples), "disabled (`near_dedup=False`)"))

    # 5. Contamination.
    index = _Contamination(test_texts, config.contamination_ngram, config.contamination_overlap)

    def contamination(ex: _Example) -> None:
        scrubbed = [m["content"] for m in ex.messages if m["role"] == "user"]
        for turn_no, (raw, clean) in enumerate(zip(ex.raw_user_turns, scrubbed, strict=True), start=1):
            why = index.find(raw) or (index.find(clean) if clean != raw else None)
            if why:
                raise _Reject("contamination", f"user turn {turn_no} {why}")

    run_step("contamination", contamination, "" if index else "no test texts given")

    # 6. Split and write.
    train: list[bytes] = []
    validation: list[bytes] = []
    pii_total: Counter[str] = Counter()
    with_pii = 0
    for ex in examples:
        line = json.dumps({"messages": ex.messages}, ensure_ascii=False).encode("utf-8") + b"\n"
        (validation if _split_of(ex.key, config) == "validation" else train).append(line)
        pii_total.update(ex.pii)
        with_pii += bool(ex.pii)
    steps.append(StepCount("split", len(examples), len(examples), f"{len(train)} train, {len(validation)} validation"))

    outputs: dict[str, dict[str, Any]] = {}
    for name, rows in (("train.jsonl", train), ("validation.jsonl", validation)):
        data = b"".join(rows)
        _atomic_write(out / name, data)
        outputs[name] = {"rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}

    report = CurationReport(
        config=config,
        out_dir=out,
        inputs=inputs,
        steps=steps,
        rejections=rejections,
        pii_counts={k: pii_total[k] for k in PII_KINDS if pii_total[k]},
        examples_with_pii=with_pii,
        outputs=outputs,
        length_unit=length_unit,
    )
    report_dict = report.to_dict()
    _atomic_write(out / "report.html", render_html(report_dict).encode("utf-8"))
    _atomic_write(out / "report.json", (json.dumps(report_dict, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return report


# --------------------------------------------------------------------------------------------------
# HTML report

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1000px;
color:#1f2328;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.35rem .6rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#656d76}code{background:#f6f8fa;padding:0 .2rem;border-radius:3px}
"""


def _bar_chart(counts: dict[str, int]) -> str:
    """Horizontal bar chart as inline SVG."""
    row_h, label_w, bar_w, pad = 24, 150, 420, 60
    peak = max(counts.values(), default=0) or 1
    height = row_h * len(counts) + 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + pad}" height="{height}" '
        f'role="img" aria-label="rejections per rule">'
    ]
    for i, (rule, n) in enumerate(counts.items()):
        y = 4 + i * row_h
        w = round(bar_w * n / peak) if n else 0
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end" font-size="13">'
            f"{html.escape(rule)}</text>"
            f'<rect x="{label_w}" y="{y + 3}" width="{max(w, 1)}" height="{row_h - 8}" '
            f'fill="{"#cf222e" if n else "#d0d7de"}"/>'
            f'<text x="{label_w + w + 6}" y="{y + 16}" font-size="13">{n}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="n">{v}</td>' if isinstance(v, int) else f"<td>{html.escape(str(v))}</td>" for v in row
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page for a `report.json` dict; every user-supplied string is escaped."""
    s = report["summary"]
    summary = _table(
        ["", "rows"],
        [
            ("rows read", s["rows_in"]),
            ("rejected", s["rejected"]),
            ("kept", s["kept"]),
            ("train", s["train"]),
            ("validation", s["validation"]),
            ("examples with PII masked", s["examples_with_pii"]),
        ],
    )
    inputs = _table(
        ["file", "format", "rows", "sha256"],
        [(i["path"], i["format"], i["rows"], i["sha256"][:16]) for i in report["inputs"]],
    )
    steps = _table(
        ["step", "in", "out", "removed", "note"],
        [(st["name"], st["in"], st["out"], st["removed"], st["note"]) for st in report["steps"]],
    )
    pii = report["pii_masked"]
    pii_table = (
        _table(["kind", "placeholder", "masked"], [(k, f"[{k}]", n) for k, n in pii.items()])
        if pii
        else '<p class="muted">No PII found in the kept examples.</p>'
    )
    sample_rows = [
        (rule, r["source"], r["line"], r["message"])
        for rule, items in report["sample_rejections"].items()
        for r in items
    ]
    samples = (
        _table(["rule", "file", "line", "reason"], sample_rows)
        if sample_rows
        else '<p class="muted">Nothing was rejected.</p>'
    )
    outputs = _table(
        ["file", "rows", "sha256"], [(name, o["rows"], o["sha256"]) for name, o in report["outputs"].items()]
    )
    cfg = html.escape(json.dumps(report["config"], indent=2))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Curation report</title>
<style>{_CSS}</style></head><body>
<h1>Curation report</h1>
<p class="muted">Lengths measured in {html.escape(report["length_unit"])}.
Dataset hash <code>{html.escape(str(report.get("dataset_hash", "")))}</code>.</p>
<h2>Summary</h2>{summary}
<h2>Rejections per rule</h2>{_bar_chart(report["rejected_by_rule"])}
<h2>Pipeline steps</h2>{steps}
<h2>PII masked</h2>{pii_table}
<h2>Sample rejections</h2>
<p class="muted">Up to {report["config"]["max_samples_per_rule"]} per rule; lines are 1-based.</p>{samples}
<h2>Inputs</h2>{inputs}
<h2>Outputs</h2>{outputs}
<h2>Configuration</h2><pre>{cfg}</pre>
</body></html>
"""


# --------------------------------------------------------------------------------------------------
# Test sets to keep out of training


def read_test_texts(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Test texts from .txt (one per line) or JSONL files: the last user turn of `messages`, else the
    `question`, `prompt`, `text` or `input` field."""
    texts = []
    for path in map(Path, paths):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                texts.append(line)
                continue
            obj = json.loads(line)
            if "messages" in obj:
                texts.append(next(m["content"] for m in reversed(obj["messages"]) if m["role"] == "user"))
            else:
                texts.append(next(str(obj[k]) for k in ("question", "prompt", "text", "input") if k in obj))
    return texts
