"""A test set as an lm-evaluation-harness task: `<task>.yaml` + `<task>.jsonl`, run against the gateway.

`export_lm_eval(rows, out_dir, task)` writes both files atomically and returns an `ExportResult` whose
`command(model, base_url)` is the `lm_eval --model local-chat-completions ...` line that scores the set
through tunegate's OpenAI API (the gateway answers it like any application; guardrails, logs and all).

Rows are `{"id": str, "messages": [{"role", "content"}, ...], "answer": str}`: `messages` is the
conversation up to, not including, the gold assistant turn (so it ends with a `user` turn) and `answer`
is the exact gold string.

What lm_eval sends (read from lm_eval 0.4.13: `api/task.py` `fewshot_context`/`build_qa_turn`,
`api/utils.py` `multiturn_to_singleturn`, `models/api_models.py` `apply_chat_template`, which for an
API model returns the message list as JSON, and `models/openai_completions.py` `LocalChatCompletion`):
with `--apply_chat_template` and zero shots, one document becomes `[system?, user]`: the system turn is
the task's `description` resolved against the document (here the field `system`: the row's leading
system turns, after `description`; no system turn when empty), and the user turn is `doc_to_text`
verbatim (the field `prompt`). A row asking one question therefore reaches the gateway exactly as an
application would send it. lm_eval has no way to send a multi-turn conversation per document (it
collapses every turn into one user message), so a row with earlier turns is flattened into `prompt` as
"User: ...\n\nAssistant: ...\n\nUser: ..." - its score is lm_eval's, not the one the conversation gets
when sent natively.

The metric is tunegate's fact accuracy (`training/fact_eval.py::normalise`: strip, whitespace runs to
one space, trailing dots off, casefold; then equality), expressed in lm_eval's terms:
- filter `strip` on the answer: `regex` `(?s).*` keeps the whole text and strips it (a missing answer,
  `content: null`, becomes ""), then `take_first`;
- `exact_match` with `regexes_to_ignore` applied in order to answer and gold alike: leading and
  trailing whitespace, every whitespace character that follows another (a run keeps its first), the
  trailing dots; then `ignore_case` (`str.lower`). `ignore_punctuation` stays off: "0.213" is not "0213".
This equals `normalise(a) == normalise(b)` for every pair of strings except two cases removal by regex
cannot express: a whitespace run whose first character is not a space ("a\\nb" is "a b" to tunegate, "a\\nb"
here), and letters whose `lower()` differs from `casefold()` (ß, ﬁ; never in ASCII). The gold answers are
written as given; nothing is normalised at export.

Imports `core.io` and PyYAML only.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.io import atomic_write_bytes, sha256_file, write_jsonl

TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+")
ROLES = ("system", "user", "assistant")
MAX_GEN_TOKS = 16
FILTER = "strip"  # the filter's name: lm_eval reports the score as `exact_match,strip`
# Applied in order by lm_eval's exact_match (re.sub(pattern, "", text)) to prediction and gold alike.
REGEXES_TO_IGNORE = [r"\A\s+|\s+\Z", r"(?<=\s)\s+", r"\.+\Z"]


@dataclass(frozen=True)
class ExportResult:
    """The exported task: its files, how many documents, the JSONL's SHA-256, and the command to run it."""

    task: str
    out_dir: Path
    yaml_path: Path
    jsonl_path: Path
    rows: int
    sha256: str  # of the JSONL (the documents)
    yaml_sha256: str
    max_gen_toks: int = MAX_GEN_TOKS

    @property
    def metric_key(self) -> str:
        """The key of the score in lm_eval's results JSON: `results[task][metric_key]`."""
        return f"exact_match,{FILTER}"

    def argv(
        self,
        model: str,
        base_url: str,
        *,
        output_path: str | Path | None = None,
        lm_eval: str = "lm_eval",
        num_concurrent: int = 1,
        log_samples: bool = False,
    ) -> list[str]:
        """`command()` as an argument list (for `subprocess`); set `OPENAI_API_KEY` in its environment."""
        if not model or re.search(r"[,=\s]", model):
            raise ValueError(f"`model` {model!r} cannot be passed in lm_eval's model_args (no ',', '=' or spaces)")
        model_args = ",".join(
            [
                f"model={model}",
                f"base_url={chat_completions_url(base_url)}",
                f"num_concurrent={int(num_concurrent)}",
                "max_retries=1",
                "tokenized_requests=False",
            ]
        )
        argv = [
            lm_eval,
            "--model", "local-chat-completions",
            "--model_args", model_args,
            "--tasks", self.task,
            "--include_path", str(self.out_dir),
            "--apply_chat_template",
            "--gen_kwargs", f"temperature=0,max_gen_toks={self.max_gen_toks}",
            "--output_path", str(output_path if output_path is not None else self.out_dir / "results"),
        ]  # fmt: skip
        return argv + (["--log_samples"] if log_samples else [])

    def command(self, model: str, base_url: str, **kwargs: Any) -> str:
        """The `lm_eval` command line that scores this task through the gateway at `base_url` (the gateway's
        root, `.../v1` or `.../v1/chat/completions`) with the gateway model or route `model`.

        The gateway wants `Authorization: Bearer <key>`; lm_eval's `local-chat-completions` sends
        `Bearer $OPENAI_API_KEY` (`LocalCompletionsAPI.api_key` reads the environment variable), so run it
        as `OPENAI_API_KEY=<an app key> <command>`. Greedy (`temperature=0`), at most `max_gen_toks` tokens,
        no stop strings: the same request tunegate's own fact accuracy sends."""
        return shlex.join(self.argv(model, base_url, **kwargs))


def chat_completions_url(base_url: str) -> str:
    """The gateway's chat-completions endpoint from its root, `.../v1` or the endpoint itself."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if not url.endswith("/v1"):
        url += "/v1"
    return url + "/chat/completions"


def export_lm_eval(
    rows: Iterable[Mapping[str, Any]], out_dir: Path, task: str, *, description: str = ""
) -> ExportResult:
    """Write `out_dir/<task>.jsonl` (one document per row) and `out_dir/<task>.yaml` (the task naming it),
    each atomically, the JSONL first; `ValueError` for a bad task name or row (naming its index and field)."""
    if not isinstance(task, str) or not TASK_NAME.fullmatch(task):
        raise ValueError(f"task name {task!r} must match [A-Za-z0-9_.-]+")
    if not isinstance(description, str):
        raise ValueError("`description` must be a string")
    docs = [_document(i, row, description) for i, row in enumerate(rows)]
    if not docs:
        raise ValueError("no rows to export: lm_eval cannot run an empty task")
    seen: dict[str, int] = {}
    for i, doc in enumerate(docs):
        if doc["id"] in seen:
            raise ValueError(f"row {i}: `id` {doc['id']!r} repeats row {seen[doc['id']]}")
        seen[doc["id"]] = i
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl_path = write_jsonl(out_dir / f"{task}.jsonl", docs, atomic=True)
    yaml_path = atomic_write_bytes(out_dir / f"{task}.yaml", task_yaml(task, jsonl_path).encode("utf-8"))
    return ExportResult(
        task=task,
        out_dir=out_dir,
        yaml_path=yaml_path,
        jsonl_path=jsonl_path,
        rows=len(docs),
        sha256=sha256_file(jsonl_path),
        yaml_sha256=sha256_file(yaml_path),
    )


def task_yaml(task: str, jsonl_path: Path, max_gen_toks: int = MAX_GEN_TOKS) -> str:
    """The task's YAML. The JSONL is named by absolute path: `datasets` resolves a relative `data_files`
    against the working directory, not the YAML's folder, so the command works from anywhere (export again
    after moving the folder)."""
    config = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(jsonl_path)}},
        "test_split": "test",
        "output_type": "generate_until",
        "num_fewshot": 0,
        "description": "system",  # a document field: the system turn (none when empty)
        "doc_to_text": "prompt",
        "doc_to_target": "answer",
        "target_delimiter": "",
        "generation_kwargs": {
            "until": [],  # no stop strings: the chat model ends its turn itself
            "max_gen_toks": max_gen_toks,
            "temperature": 0,
            "do_sample": False,
        },
        "filter_list": [
            {
                "name": FILTER,
                "filter": [
                    {"function": "regex", "regex_pattern": r"(?s).*", "group_select": 0, "fallback": ""},
                    {"function": "take_first"},
                ],
            }
        ],
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": False,
                "regexes_to_ignore": list(REGEXES_TO_IGNORE),
            }
        ],
        "metadata": {"version": 1.0, "source": "tunegate evals export"},
    }
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def _document(index: int, row: Any, description: str) -> dict[str, Any]:
    """One row checked and turned into lm_eval's document: id, messages, answer, system, prompt."""
    if not isinstance(row, Mapping):
        raise ValueError(f"row {index}: not an object")
    row_id = row.get("id", str(index))
    if not isinstance(row_id, str) or not row_id:
        raise ValueError(f"row {index}: `id` must be a non-empty string")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"row {index}: `messages` is missing or not a non-empty list")
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise ValueError(f"row {index}: `messages[{j}].role` must be one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"row {index}: `messages[{j}].content` must be a string")
    if messages[-1]["role"] != "user":
        raise ValueError(f"row {index}: `messages` must end with a user turn (the gold answer is `answer`)")
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"row {index}: `answer` is missing or not a non-empty string")
    lead = 0
    while messages[lead]["role"] == "system":
        lead += 1
    turns = messages[lead:]
    system = "\n\n".join(s for s in [description, *(m["content"] for m in messages[:lead])] if s)
    if len(turns) == 1:
        prompt = turns[0]["content"]
    else:
        prompt = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)
    return {
        "id": row_id,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "answer": answer,
        "system": system,
        "prompt": prompt,
    }
