"""Reading curation inputs: chat JSONL, prompt/completion JSONL and Alpaca JSON arrays, as chat examples.

Owns `FORMATS`, `InputFile` (one input file read into valid `Example`s and `Rejection`s, the format
detected from its first record) and `read_test_texts` (the eval texts training must not contain).
A bad row becomes a `json`, `schema` or `roles` rejection with its 1-based line, never a crash;
every value is parsed by the standard `json` module. Imports `training.curation.rules` and `core.io`.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from core.io import last_user_text, read_jsonl, sha256_file
from training.curation.rules import Example, Reject, Rejection, check_roles

FORMATS: tuple[str, ...] = ("chat", "prompt_completion", "alpaca")
_BOM = b"\xef\xbb\xbf"
_SKIPPED = "the rest of the file was skipped"
_ARRAY_START = re.compile(r"\s*\ufeff?\s*\[\s*")  # a byte order mark after white space too
_SPACE = re.compile(r"\s*")


def detect(record: Any) -> str | None:
    """The format of one record, or None when it is none of `FORMATS`."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


# --------------------------------------------------------------------------------------------------
# Records: (line, parsed JSON value) or a `json` rejection


def _iter_jsonl(path: Path, source: str) -> Iterator[tuple[int, Any] | Rejection]:
    """Each non-blank line parsed; a bad line is rejected and reading goes on."""
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
    """Each item of a JSON array with the line it starts on; the first broken item ends the file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        yield Rejection("json", f"file is not valid UTF-8 ({exc.reason}); {_SKIPPED}", source, line)
        return
    newlines = [m.start() for m in re.finditer("\n", text)]

    def line_at(pos: int) -> int:
        return bisect.bisect_left(newlines, pos) + 1

    decoder = json.JSONDecoder()
    pos = _ARRAY_START.match(text).end()
    if not text.startswith("]", pos):  # not an empty array
        while True:
            try:
                item, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                yield Rejection("json", f"invalid JSON: {exc}; {_SKIPPED}", source, exc.lineno)
                return
            except (ValueError, RecursionError) as exc:
                yield Rejection("json", f"invalid JSON: {exc}; {_SKIPPED}", source, line_at(pos))
                return
            yield line_at(pos), item
            pos = _SPACE.match(text, end).end()
            if not text.startswith(",", pos):
                break
            pos = _SPACE.match(text, pos + 1).end()
        if not text.startswith("]", pos):
            what = "the end of the file" if pos >= len(text) else repr(text[pos])
            found = f"expected `,` or `]` after an array item, found {what}; {_SKIPPED}"
            yield Rejection("json", found, source, line_at(pos))
            return
    if _SPACE.match(text, pos + 1).end() != len(text):
        yield Rejection("json", "unexpected data after the JSON array", source, line_at(pos))


def _iter_records(path: Path, source: str) -> Iterator[tuple[int, Any] | Rejection]:
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip()
    if head.removeprefix(_BOM).lstrip().startswith(b"["):
        yield from _iter_json_array(path.read_bytes().removeprefix(_BOM), source)
    else:
        yield from _iter_jsonl(path, source)


# --------------------------------------------------------------------------------------------------
# Normalising a record to chat messages (`schema` rejections)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise Reject("schema", f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise Reject("schema", f"{what} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Reject("schema", f"{what} is not valid Unicode ({exc.reason})") from None
    return value


def _chat_messages(raw: Any, what: str = "`messages`") -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise Reject("schema", f"{what} must be a non-empty list of messages")
    messages = []
    for i, msg in enumerate(raw, start=1):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise Reject("schema", f"message {i} must be an object with `role` and `content`")
        role = msg["role"]
        if not isinstance(role, str):
            raise Reject("schema", f"message {i} has a non-string `role`")
        messages.append({"role": role, "content": _text(msg["content"], f"message {i} `content`")})
    return messages


def normalise(fmt: str | None, record: Any) -> list[dict[str, str]]:
    """`record`, which must be in format `fmt`, as chat messages."""
    if fmt is None:
        raise Reject(
            "schema", "unrecognised record: expected `messages`, `prompt`+`completion`, or `instruction`+`output`"
        )
    if not isinstance(record, dict):
        raise Reject("schema", f"expected a JSON object, got {type(record).__name__}")
    if detect(record) != fmt:
        keys = ", ".join(sorted(map(str, record))[:8])
        raise Reject("schema", f"expected a record in `{fmt}` format like the rest of this file, got keys [{keys}]")
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
        raise Reject("schema", f"`input` must be a string, got {type(extra).__name__}")
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": _text(record["system"], "`system`")})
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": _text(record["output"], "`output`")})
    return messages


class InputFile:
    """One input file, iterated as valid `Example`s and `Rejection`s in file order.

    `input_format` is a name in `FORMATS`, or `auto` to take the format of the first record that
    has one. Iterating counts `rows` (items read), `parsed` (items that were JSON) and `valid`.
    """

    def __init__(self, path: str | os.PathLike[str], input_format: str = "auto") -> None:
        self.path = Path(path)
        self.source = str(path)
        self.format = None if input_format == "auto" else input_format
        self.rows = self.parsed = self.valid = 0

    def __iter__(self) -> Iterator[Example | Rejection]:
        for item in _iter_records(self.path, self.source):
            self.rows += 1
            if isinstance(item, Rejection):
                yield item
                continue
            self.parsed += 1
            line, record = item
            self.format = self.format or detect(record)
            try:
                messages = normalise(self.format, record)
                check_roles(messages)
            except Reject as rej:
                yield rej.at(self.source, line)
                continue
            self.valid += 1
            yield Example(messages, self.source, line)

    def summary(self) -> dict[str, Any]:
        """What the report says about this input."""
        fmt = self.format or "unknown"
        return {"path": self.source, "format": fmt, "rows": self.rows, "sha256": sha256_file(self.path)}


def read_test_texts(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Test texts from .txt (one per line) or JSONL files: the last user turn of `messages`, else the
    `question`, `prompt`, `text` or `input` field."""
    texts = []
    for path in map(Path, paths):
        if path.suffix != ".jsonl":
            texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            continue
        for _, obj in read_jsonl(path):
            if "messages" in obj:
                texts.append(last_user_text(obj["messages"]))
            else:
                texts.append(next(str(obj[k]) for k in ("question", "prompt", "text", "input") if k in obj))
    return texts
