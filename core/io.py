"""Files and small shared helpers: JSON Lines, atomic writes, content hashes, a free port, the question.

One helper per job, so every package reads and writes data the same way: `read_jsonl`/`write_jsonl`
(one JSON object a line, the format tunegate's data moves in), `atomic_write_bytes`/`atomic_write_json`
(temp file + fsync + rename: a crash leaves the old file or the new one, never half of one),
`sha256_file`/`sha256_text`, `free_port`, and `last_user_text` (the question a conversation asks).
Standard library only; imports nothing of ours.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


def read_jsonl(path: str | os.PathLike[str], error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL file; a bad line raises `error`
    naming the file and line."""
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}:{lineno}: not JSON ({err.msg})") from None


def jsonl_text(rows: Iterable[Any]) -> str:
    """The JSONL serialisation of `rows` (one compact JSON value a line, non-ASCII kept as is)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Any], *, atomic: bool = False) -> Path:
    """Write `rows` to `path` (its folder is created), atomically when asked; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = jsonl_text(rows).encode("utf-8")
    if atomic:
        atomic_write_bytes(path, data)
    else:
        path.write_bytes(data)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace `path` with `data` in one step: written to a hidden temp file beside it, fsynced, renamed."""
    path = Path(path)
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
    return path


def atomic_write_json(path: str | os.PathLike[str], data: Mapping[str, Any] | list) -> Path:
    """`data` as indented, key-sorted JSON (a trailing newline), written atomically."""
    return atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_user_text(messages: Any, fallback: str = "") -> str:
    """The question a conversation asks: the content of its last `user` turn with text, else `fallback`.

    Accepts what clients send (dicts) and what pydantic parsed (objects with `role`/`content`)."""
    for message in reversed(messages if isinstance(messages, list) else []):
        role = message.get("role") if isinstance(message, Mapping) else getattr(message, "role", None)
        content = message.get("content") if isinstance(message, Mapping) else getattr(message, "content", None)
        if role == "user" and isinstance(content, str):
            return content
    return fallback


def normalise_answer(answer: str) -> str:
    """How answers are compared everywhere (fact accuracy, the gate, online scoring): whitespace
    collapsed, a final full stop dropped, case folded."""
    return " ".join(answer.strip().split()).rstrip(".").casefold()
